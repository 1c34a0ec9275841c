//! The `ferry client` process through the server's ups and downs: started before its
//! server, a server restart, and a service whose host is held by another client.

use crate::cli::{client_process, spawn_server_process, start_server_process};
use crate::common::*;
use ferry::{Client, ServiceConfig};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout};

type LinesOf<R> = Lines<BufReader<R>>;

fn stdout_of(child: &mut Child) -> LinesOf<ChildStdout> {
    BufReader::new(child.stdout.take().unwrap()).lines()
}

fn stderr_of(child: &mut Child) -> LinesOf<ChildStderr> {
    BufReader::new(child.stderr.take().unwrap()).lines()
}

/// The next line that contains `wanted` (the caller's `within` bounds the wait).
async fn line_with<R: tokio::io::AsyncRead + Unpin>(lines: &mut LinesOf<R>, wanted: &str) -> String {
    loop {
        let line = lines.next_line().await.unwrap().unwrap_or_else(|| panic!("ended before '{wanted}'"));
        if line.contains(wanted) {
            return line;
        }
    }
}

/// The address of a "LOCAL is reachable at ADDR" line.
fn reachable_at(line: &str) -> String {
    line.rsplit(' ').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_before_its_server_waits_for_it() {
    within(60, async {
        let server_port = free_port().await;
        let echo = echo_server().await;
        let local = format!("tcp://{echo}");
        let mut client = client_process(server_port, "secret1", &["--local", &local]).spawn().unwrap();
        let (mut out, mut err) = (stdout_of(&mut client), stderr_of(&mut client));
        // It found no server, and says it will try again instead of exiting.
        let failed = line_with(&mut err, "login failed; retrying").await;
        assert!(failed.contains("cannot reach the server"), "{failed}");
        assert!(client.try_wait().unwrap().is_none(), "the client exited");

        let mut server = start_server_process(server_port, &["--tcp-range", "1024-65535"]).await;
        let public = reachable_at(&line_with(&mut out, "is reachable at").await);
        assert_eq!(echo_through(public.parse().unwrap(), b"up").await.unwrap(), b"up");
        client.kill().await.unwrap();
        server.kill().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_client_waiting_for_its_server_stops_on_sigterm() {
    within(30, async {
        let server_port = free_port().await;
        let mut client =
            client_process(server_port, "secret1", &["--local", "tcp://127.0.0.1:1"]).spawn().unwrap();
        let mut err = stderr_of(&mut client);
        line_with(&mut err, "login failed; retrying").await;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(client.id().unwrap()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(client.wait().await.unwrap().success(), "a stop asked for is a clean exit");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_the_addresses_are_printed_again() {
    within(60, async {
        let (mut server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let echo = echo_server().await;
        let local = format!("tcp://{echo}");
        let mut client = client_process(server_port, "secret1", &["--local", &local]).spawn().unwrap();
        let mut out = stdout_of(&mut client);
        let first = reachable_at(&line_with(&mut out, "is reachable at").await);

        server.kill().await.unwrap();
        server.wait().await.unwrap();
        let mut server = start_server_process(server_port, &["--tcp-range", "1024-65535"]).await;
        let again = reachable_at(&line_with(&mut out, "is reachable at").await);
        assert_eq!(again, first, "the same port is asked for again");
        assert_eq!(echo_through(again.parse().unwrap(), b"back").await.unwrap(), b"back");
        client.kill().await.unwrap();
        server.kill().await.unwrap();
    })
    .await
}

/// One service is refused (its host is held by another client), the other runs; when the
/// holder leaves, the refused one is asked for again and opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_service_is_retried_while_the_others_run() {
    within(60, async {
        let (mut server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let server_addr = format!("127.0.0.1:{server_port}").parse().unwrap();
        let site = crate::common::http::http_service("site").await.to_string();
        let holder = Client::connect(client_config(server_addr, "id1", "secret1")).await.unwrap();
        let _ = holder.add_service(ServiceConfig::http(&site).with_host_prefix("site")).await.unwrap();

        let echo = format!("tcp://{}", echo_server().await);
        let http = format!("http://{site}");
        let services = ["--local", &echo, "--local", &http, "--host-prefix", "site"];
        let mut client = client_process(server_port, "secret1", &services).spawn().unwrap();
        let (mut out, mut err) = (stdout_of(&mut client), stderr_of(&mut client));
        let refused = line_with(&mut err, "asking again later").await;
        assert!(refused.contains("host 'site' is already in use"), "{refused}");
        let tcp = reachable_at(&line_with(&mut out, "is reachable at").await);
        assert_eq!(echo_through(tcp.parse().unwrap(), b"still here").await.unwrap(), b"still here");
        assert!(client.try_wait().unwrap().is_none(), "the client exited");

        holder.shutdown().await;
        let opened = line_with(&mut out, "is reachable at").await;
        assert!(opened.starts_with(&format!("{site} is reachable at http://site")), "{opened}");
        client.kill().await.unwrap();
        server.kill().await.unwrap();
    })
    .await
}

/// The library: a final error (a wrong secret) is returned at once instead of retried.
#[tokio::test]
async fn connect_retrying_gives_up_on_a_wrong_secret() {
    within(30, async {
        let server = start_server(server_config()).await;
        let wrong = Client::connect_retrying(client_config(server.local_addr(), "id1", "wrong")).await;
        let wrong = wrong.unwrap_err();
        assert!(wrong.is_fatal() && wrong.to_string().contains("authentication failed"), "{wrong}");
        let client =
            Client::connect_retrying(client_config(server.local_addr(), "id1", "secret1")).await.unwrap();
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}

/// A final error after a reconnect stops the client (state `Failed`) instead of retrying
/// it without end: here its user was removed by a reload.
#[tokio::test]
async fn a_final_error_after_a_reconnect_stops_the_client() {
    within(30, async {
        let config = server_config().with_user("leaving", "s");
        let server = start_server(config.clone()).await;
        let client = Client::connect(client_config(server.local_addr(), "leaving", "s")).await.unwrap();
        let mut state = client.state();
        let mut reloaded = config.clone();
        reloaded.users.remove("leaving");
        assert_eq!(server.reload(&reloaded).unwrap(), 1);
        let stopped =
            state.wait_for(|s| matches!(s, ferry::ClientState::Failed { .. })).await.unwrap().clone();
        assert!(stopped.to_string().starts_with("failed: "), "{stopped}");
        server.shutdown().await;
    })
    .await
}

/// A certificate the client does not trust is final: `connect_retrying` returns it
/// instead of trying again.
#[tokio::test]
async fn connect_retrying_gives_up_on_an_untrusted_certificate() {
    use crate::tls::{make_certs, tls_client_config, tls_server};
    within(30, async {
        let (certs, other) = (make_certs(), make_certs());
        let server = tls_server(&certs).await;
        let config = tls_client_config(&server, ferry::RemoteTrust::CaFile(other.cert.clone()));
        let err = Client::connect_retrying(config).await.unwrap_err();
        assert!(err.is_fatal() && err.to_string().to_lowercase().contains("certificate"), "{err}");
        server.shutdown().await;
    })
    .await
}
