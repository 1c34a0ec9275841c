//! Network namespaces for fault tests: create them, join them with veth pairs, run
//! processes and sockets inside them, and load nftables rules. Everything is removed on
//! drop, also when a test fails. Needs root, `ip` (iproute2) and `nft` (nftables).
//!
//! Interface names and addresses live inside each namespace, so every test may use the
//! same ones; only namespace names must be unique (they get the process id and a counter).

use std::fs::File;
use std::io::Write;
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Whether namespace tests can run here. Without root, `ip` or `nft` they fail with a
/// message saying so, unless `FERRY_SKIP_NETNS=1` asks to skip them (then `false`).
pub fn available(test: &str) -> bool {
    if std::env::var("FERRY_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped (FERRY_SKIP_NETNS=1)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root for network namespaces; FERRY_SKIP_NETNS=1 skips it"
    );
    for tool in ["ip", "nft"] {
        let found = StdCommand::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "{test} needs `{tool}` (apt-get install iproute2 nftables); FERRY_SKIP_NETNS=1 skips it"
        );
    }
    true
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) {
    let out = StdCommand::new(program).args(args).stdin(Stdio::null()).output().expect("command starts");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One network namespace, deleted on drop (with its interfaces).
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace whose name contains `role`, with its loopback up.
    pub fn new(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        static STALE_REMOVED: Once = Once::new();
        STALE_REMOVED.call_once(remove_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("ferry-{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Sets a sysctl inside the namespace, e.g. `net.ipv4.ip_forward=1`.
    pub fn sysctl(&self, setting: &str) {
        run("ip", &["netns", "exec", &self.name, "sysctl", "-q", "-w", setting]);
    }

    /// Loads an nftables script inside the namespace (`nft -f -`).
    pub fn nft(&self, script: &str) {
        let mut child = StdCommand::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft starts");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the program's own). Killed when dropped.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]).kill_on_drop(true).stdin(Stdio::null());
        command
    }

    /// Runs `f` on a thread that entered this namespace: sockets it creates belong to the
    /// namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let handle = File::open(format!("/var/run/netns/{}", self.name)).expect("namespace file");
        std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A listener bound to `addr` inside the namespace.
    pub fn listen(&self, addr: &str) -> tokio::net::TcpListener {
        let addr = addr.to_owned();
        let std = self.enter(move || std::net::TcpListener::bind(addr).expect("bind in namespace"));
        std.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// `count` unconnected IPv4 TCP sockets of this namespace, to connect from anywhere.
    pub fn sockets(&self, count: usize) -> Vec<tokio::net::TcpSocket> {
        self.enter(move || (0..count).map(|_| tokio::net::TcpSocket::new_v4().expect("socket")).collect())
    }

    /// Connects from inside the namespace.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.sockets(1).pop().unwrap().connect(addr).await
    }
}

/// Deletes the namespaces of test processes that are gone (killed before their drops ran).
fn remove_stale() {
    let Ok(listed) = StdCommand::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let owner = name.strip_prefix("ferry-").and_then(|rest| rest.split('-').next());
        if owner.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = StdCommand::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = StdCommand::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins two namespaces with a veth pair: `a_if` in `a` with `a_addr` (CIDR), `b_if` in `b`
/// with `b_addr`; both ends up. The pair goes away with either namespace.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    a.ip(&["link", "add", "name", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A process inside a namespace whose output lines (stdout and stderr) are kept with the
/// time each arrived, so tests can wait for a line and count lines.
pub struct NsProcess {
    /// The process (killed on drop).
    pub child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    seen: watch::Receiver<usize>,
}

impl NsProcess {
    /// Starts `command` with its output captured.
    pub fn spawn(mut command: Command) -> NsProcess {
        let mut child =
            command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("process starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tell, seen) = watch::channel(0);
        let tell = Arc::new(tell);
        collect(child.stdout.take().unwrap(), lines.clone(), tell.clone());
        collect(child.stderr.take().unwrap(), lines.clone(), tell);
        NsProcess { child, lines, seen }
    }

    /// The process id.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id().expect("running")).unwrap())
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// How many threads the process has now.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// How many file descriptors the process has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// How many lines so far contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|(_, l)| l.contains(text)).count()
    }

    /// All output so far, for failure messages.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Waits (at most `limit`) for the `nth` line (0-based) that contains `text`; returns
    /// when it arrived and the line. Panics with the output so far on timeout.
    pub async fn line(&mut self, text: &str, nth: usize, limit: Duration) -> (Instant, String) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let found = self.lines.lock().unwrap().iter().filter(|(_, l)| l.contains(text)).nth(nth).cloned();
            if let Some(found) = found {
                return found;
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("output ended before line #{nth} with '{text}':\n{}", self.output()),
                Err(_) => panic!("no line #{nth} with '{text}' within {limit:?}; output:\n{}", self.output()),
            }
        }
    }
}

fn collect(
    stream: impl AsyncRead + Unpin + Send + 'static,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    tell: Arc<watch::Sender<usize>>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().unwrap().push((Instant::now(), line));
            tell.send_modify(|n| *n += 1);
        }
    });
}
