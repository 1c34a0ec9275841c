//! A real etcd (Debian's etcd-server, as `.ci/run` installs it) on loopback ports, with its
//! data in a temporary directory; killed on drop. The crate's unit tests include this file
//! too (`src/cluster/etcd.rs`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running etcd.
pub struct EtcdProcess {
    child: Child,
    /// Its client URL, e.g. `http://127.0.0.1:2379`.
    pub url: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client_port}");
        let child = Self::spawn(dir.path(), client_port, peer_port);
        let etcd = EtcdProcess { child, url, client_port, peer_port, dir };
        etcd.wait_healthy().await;
        etcd
    }

    fn spawn(dir: &std::path::Path, client: u16, peer: u16) -> Child {
        let url = format!("http://127.0.0.1:{client}");
        Command::new("etcd")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (apt-get install etcd-server, as .ci/run does)")
    }

    /// Stops etcd (its data stays for [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.client_port, self.peer_port);
        self.wait_healthy().await;
    }

    async fn wait_healthy(&self) {
        for _ in 0..200 {
            if self.healthy().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not answer within 10 s");
    }

    async fn healthy(&self) -> bool {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.client_port)).await else {
            return false;
        };
        let request = "GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
        read.is_ok() && String::from_utf8_lossy(&answer).contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
