//! Hooks for programs embedding the server, and per-service allow-ip / deny-ip.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::http::{get, http_service};
use crate::common::*;
use ferry::auth::Secret;
use ferry::{
    Client, ClientError, ClientInfo, LoginRefusal, Server, ServerHooks, ServiceConfig, ServiceInfo,
    VisitorInfo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Records every callback; knows the user "app-user"; refuses the tag "blocked" and
/// visitors of services named "private".
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    fn record(&self, event: String) {
        self.events.lock().unwrap().push(event);
    }
}

impl ServerHooks for Recorder {
    fn secret_for(&self, id: &str) -> Option<Secret> {
        (id == "app-user").then(|| Secret::new("app-secret"))
    }

    fn check_login(&self, client: &ClientInfo) -> Result<(), String> {
        if client.tags.iter().any(|t| t == "blocked") {
            return Err("tag blocked".into());
        }
        Ok(())
    }

    fn client_connected(&self, client: &ClientInfo) {
        self.record(format!("connected {}", client.user));
    }

    fn client_disconnected(&self, client: &ClientInfo, reason: &ferry::DisconnectReason) {
        self.record(format!("disconnected {}: {reason:?}", client.user));
    }

    fn tunnel_opened(&self, tunnel: &ServiceInfo) {
        self.record(format!("opened {}", tunnel.name));
    }

    fn tunnel_closed(&self, tunnel: &ServiceInfo) {
        self.record(format!("closed {} after {} visitor(s)", tunnel.name, tunnel.served));
    }

    fn allow_visitor(&self, visitor: &VisitorInfo) -> bool {
        self.record(format!("visitor {} from {}", visitor.name, visitor.address.ip()));
        visitor.name != "private"
    }
}

/// True when the visitor reaches the echo service behind `addr`.
async fn gets_through(addr: &str) -> bool {
    let Ok(mut visitor) = TcpStream::connect(addr).await else { return false };
    if visitor.write_all(b"hello").await.is_err() {
        return false;
    }
    let mut back = [0u8; 5];
    matches!(tokio::time::timeout(Duration::from_secs(5), visitor.read_exact(&mut back)).await, Ok(Ok(_)))
}

fn named(local: &str, name: &str) -> ServiceConfig {
    let mut service = ServiceConfig::tcp(local);
    service.name = name.to_owned();
    service
}

/// Waits (bounded) until `events` holds `wanted`.
async fn until_recorded(hooks: &Recorder, wanted: &str) {
    for _ in 0..500 {
        if hooks.events().iter().any(|e| e == wanted) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never recorded '{wanted}': {:?}", hooks.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_authenticate_watch_and_refuse_visitors() {
    within(60, async {
        let hooks = Arc::new(Recorder::default());
        let server = Server::bind(server_config()).await.unwrap().with_hooks(hooks.clone()).spawn();
        let addr = server.local_addr();

        // The program's own user store: right secret in, wrong secret out.
        let client = Client::connect(client_config(addr, "app-user", "app-secret")).await.unwrap();
        let wrong = Client::connect(client_config(addr, "app-user", "guess")).await;
        assert!(matches!(wrong, Err(ClientError::LoginRefused(LoginRefusal::AuthFailed { .. }))));
        let mut blocked = client_config(addr, "id1", "secret1");
        blocked.tags = vec!["blocked".into()];
        let refused = Client::connect(blocked).await;
        assert!(matches!(refused, Err(ClientError::LoginRefused(LoginRefusal::AuthFailed { .. }))));
        until_recorded(&hooks, "connected app-user").await;
        assert!(!hooks.events().contains(&"connected id1".to_string()), "the vetoed login got in");

        let echo = echo_server().await.to_string();
        let public = client.add_service(named(&echo, "public")).await.unwrap();
        let private = client.add_service(named(&echo, "private")).await.unwrap();
        until_recorded(&hooks, "opened public").await;
        assert!(gets_through(public.public_addr()).await);
        assert!(!gets_through(private.public_addr()).await, "the hook refused this visitor");
        until_recorded(&hooks, "visitor private from 127.0.0.1").await;

        public.cancel();
        until_recorded(&hooks, "closed public after 1 visitor(s)").await;
        client.shutdown().await;
        until_recorded(&hooks, "disconnected app-user: ClosedByClient").await;
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_visitor_hook_turns_http_visitors_away_with_403() {
    within(60, async {
        let hooks = Arc::new(Recorder::default());
        let server = Server::bind(server_config()).await.unwrap().with_hooks(hooks.clone()).spawn();
        let client =
            Client::connect(client_config(server.local_addr(), "app-user", "app-secret")).await.unwrap();
        let web = http_service("web").await.to_string();
        for name in ["public", "private"] {
            let mut service = ServiceConfig::http(&web).with_host_prefix(name);
            service.name = name.to_owned();
            let _ = client.add_service(service).await.unwrap();
        }

        let refused = get(server.local_addr(), "/", "private").await;
        assert_eq!(refused.status, 403, "{}", refused.text());
        assert!(!refused.text().contains("service=web"), "the service answered: {}", refused.text());
        until_recorded(&hooks, "visitor private from 127.0.0.1").await;
        // The same service behind a name the hook lets in answers.
        let allowed = get(server.local_addr(), "/", "public").await;
        assert_eq!(allowed.status, 200, "{}", allowed.text());
        assert!(allowed.text().starts_with("service=web path=/"), "{}", allowed.text());
        until_recorded(&hooks, "visitor public from 127.0.0.1").await;
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_ip_and_deny_ip_filter_visitors() {
    within(60, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await.to_string();
        let net = |text: &str| text.parse().unwrap();

        let mut denied = ServiceConfig::tcp(&echo);
        denied.deny_ip = vec![net("127.0.0.0/8")];
        let denied = client.add_service(denied).await.unwrap();
        assert!(!gets_through(denied.public_addr()).await, "deny-ip 127.0.0.0/8");

        let mut elsewhere = ServiceConfig::tcp(&echo);
        elsewhere.allow_ip = vec![net("10.0.0.0/8")];
        let elsewhere = client.add_service(elsewhere).await.unwrap();
        assert!(!gets_through(elsewhere.public_addr()).await, "allow-ip 10.0.0.0/8 only");

        let mut local = ServiceConfig::tcp(&echo);
        local.allow_ip = vec![net("127.0.0.1/32")];
        local.deny_ip = vec![net("10.0.0.0/8")];
        let local = client.add_service(local).await.unwrap();
        assert!(gets_through(local.public_addr()).await, "allow-ip 127.0.0.1/32");

        // HTTP visitors from a denied network get a 403 page.
        let mut web = ServiceConfig::http(&http_service("web").await.to_string()).with_host_prefix("web");
        web.deny_ip = vec![net("127.0.0.1/32")];
        let _ = client.add_service(web).await.unwrap();
        assert_eq!(get(server.local_addr(), "/", "web").await.status, 403);

        // The flags parse CIDRs and bare addresses, and refuse the rest.
        let cli = ferry::cli::parse_from([
            "ferry",
            "client",
            "--remote",
            "h:1",
            "--id",
            "a",
            "--secret",
            "s",
            "--local",
            "tcp://127.0.0.1:22",
            "--allow-ip",
            "192.0.2.0/24",
            "--deny-ip",
            "192.0.2.7",
        ])
        .unwrap();
        let ferry::cli::Command::Client(options) = cli.command else { panic!("not a client") };
        let (_, services) = options.into_config().unwrap();
        assert_eq!(services[0].allow_ip, vec![net("192.0.2.0/24")]);
        assert_eq!(services[0].deny_ip, vec![net("192.0.2.7/32")]);
        assert!(
            ferry::cli::parse_from(["ferry", "client", "--local", "tcp://x:1", "--deny-ip", "nope"]).is_err()
        );
        server.shutdown().await;
    })
    .await
}

/// Holds the first visitor in `allow_visitor` (as a slow lookup would) until a second
/// visitor reaches the hook, or 5 s pass.
#[derive(Default)]
struct SlowGate {
    calls: std::sync::atomic::AtomicUsize,
    second_arrived: Mutex<bool>,
    arrived: std::sync::Condvar,
    /// Whether the first call saw the second one arrive while it waited.
    overlapped: std::sync::atomic::AtomicBool,
}

impl ServerHooks for SlowGate {
    fn allow_visitor(&self, _visitor: &VisitorInfo) -> bool {
        use std::sync::atomic::Ordering;
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            let arrived = self.second_arrived.lock().unwrap();
            let (arrived, _) = self
                .arrived
                .wait_timeout_while(arrived, Duration::from_secs(5), |arrived| !*arrived)
                .unwrap();
            self.overlapped.store(*arrived, Ordering::SeqCst);
        } else {
            *self.second_arrived.lock().unwrap() = true;
            self.arrived.notify_all();
        }
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_visitor_hook_does_not_hold_up_the_next_visitor_of_the_port() {
    within(60, async {
        let hooks = Arc::new(SlowGate::default());
        let server = Server::bind(server_config()).await.unwrap().with_hooks(hooks.clone()).spawn();
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await.to_string();
        let tunnel = client.add_service(ServiceConfig::tcp(&echo)).await.unwrap();
        let public = tunnel.public_addr().to_owned();
        // The first visitor sits in the hook; the second is accepted and checked meanwhile.
        let first = tokio::spawn({
            let public = public.clone();
            async move { gets_through(&public).await }
        });
        while hooks.calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(gets_through(&public).await, "the second visitor is served");
        assert!(first.await.unwrap(), "the first visitor is served once its hook returns");
        assert!(
            hooks.overlapped.load(std::sync::atomic::Ordering::SeqCst),
            "the second visitor's hook ran while the first one's was still running"
        );
        server.shutdown().await;
    })
    .await
}
