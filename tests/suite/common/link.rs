//! An impaired link between a client namespace and a server namespace, through a router
//! namespace that can delay, reorder, drop and cut their packets:
//!
//! ```text
//! client ns            router ns                          server ns
//! eth0 10.1.0.2 --- toc 10.1.0.1   shaper (TUN)   tos 10.2.0.1 --- eth0 10.2.0.2
//! ```
//!
//! The router sends every forwarded packet into a TUN device (policy routing on the input
//! interface); two threads of the test process hold each packet for the configured delay
//! plus jitter (so packets overtake each other) and write it back, and the kernel forwards
//! it on. Loss and partitions are nftables rules in the router's forward chain. This kernel
//! has no `netem`, hence the userspace delay line.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, InterruptEvent, SyncDevice};

use super::netns::{veth, Netns};

/// How far each packet's hold spreads by default, in thousandths of the delay either way.
const DEFAULT_JITTER: u64 = 200;

/// The client's address (in [`Link::client`]).
pub const CLIENT_IP: &str = "10.1.0.2";
/// The server's address (in [`Link::server`]).
pub const SERVER_IP: &str = "10.2.0.2";

/// Three namespaces and the delay line between them; all removed on drop.
pub struct Link {
    /// Where the client and its local services run.
    pub client: Netns,
    /// Where the server and its visitors run.
    pub server: Netns,
    /// Between the two; forwards, delays and drops.
    pub router: Netns,
    delay: Arc<Mutex<Duration>>,
    /// The spread of each packet's hold, in thousandths of the delay either way.
    jitter: Arc<AtomicU64>,
    reordered: Arc<AtomicU64>,
    loss: u32,
    stop: Arc<InterruptEvent>,
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    /// Builds the topology with a perfect link (no delay, no loss).
    pub fn new() -> Link {
        let (client, router, server) = (Netns::new("c"), Netns::new("r"), Netns::new("s"));
        veth(&router, "toc", "10.1.0.1/24", &client, "eth0", "10.1.0.2/24");
        veth(&router, "tos", "10.2.0.1/24", &server, "eth0", "10.2.0.2/24");
        client.ip(&["route", "add", "default", "via", "10.1.0.1"]);
        server.ip(&["route", "add", "default", "via", "10.2.0.1"]);
        router.sysctl("net.ipv4.ip_forward=1");
        // Packets come back out of the TUN device with the sender's address: no reverse-path check.
        router.sysctl("net.ipv4.conf.all.rp_filter=0");
        router.sysctl("net.ipv4.conf.default.rp_filter=0");
        let device =
            Arc::new(router.enter(|| {
                DeviceBuilder::new().name("shaper").enable(true).build_sync().expect("TUN device")
            }));
        device.set_nonblocking(true).unwrap();
        for from in ["toc", "tos"] {
            router.ip(&["rule", "add", "iif", from, "table", "100"]);
        }
        router.ip(&["route", "add", "default", "dev", "shaper", "table", "100"]);
        router.nft(
            "table inet fault {\n chain forward { type filter hook forward priority 0; policy accept; }\n}\n",
        );
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let jitter = Arc::new(AtomicU64::new(DEFAULT_JITTER));
        let stop = Arc::new(InterruptEvent::new().unwrap());
        let reordered = Arc::new(AtomicU64::new(0));
        let line = (delay.clone(), jitter.clone(), reordered.clone());
        let threads = spawn_delay_line(device, line, stop.clone());
        Link { client, server, router, delay, jitter, reordered, loss: 0, stop, threads }
    }

    /// Holds every packet, each direction, for `delay` ± a fifth of it (so packets reorder;
    /// the round trip gains twice `delay`), and drops `loss` percent of them at random.
    pub fn set(&mut self, delay: Duration, loss: u32) {
        *self.delay.lock().unwrap() = delay;
        self.loss = loss;
        self.heal();
    }

    /// Spreads each packet's hold by `share` of the delay either way (0.2 by default, so
    /// packets reorder; 0 keeps them in order).
    pub fn set_jitter(&self, share: f64) {
        self.jitter.store((share * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Drops every packet both ways until [`Link::heal`].
    pub fn partition(&self) {
        self.forward_rules("drop");
    }

    /// Ends a partition: back to the loss of the last [`Link::set`].
    pub fn heal(&self) {
        match self.loss {
            0 => self.forward_rules(""),
            // Each packet passes the forward chain twice (into the delay line and out of
            // it): only the first pass, from a veth, may drop it.
            loss => self.forward_rules(&format!(
                "iifname {{ \"toc\", \"tos\" }} numgen random mod 100 < {loss} drop"
            )),
        }
    }

    fn forward_rules(&self, rule: &str) {
        let add =
            if rule.is_empty() { String::new() } else { format!("add rule inet fault forward {rule}\n") };
        self.router.nft(&format!("flush chain inet fault forward\n{add}"));
    }

    /// How many packets so far left the delay line before one that entered it earlier.
    pub fn reordered(&self) -> u64 {
        self.reordered.load(Ordering::Relaxed)
    }

    /// `ip:port` of the server namespace.
    pub fn server_addr(port: u16) -> std::net::SocketAddr {
        format!("{SERVER_IP}:{port}").parse().unwrap()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stop.trigger();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A packet and when to send it on.
type Held = (Instant, u64, Vec<u8>);

/// The reader takes packets off the TUN device and stamps their release time; the writer
/// sends them back in release order. Both end when `stop` is triggered.
/// `reordered` counts packets sent on before one that arrived earlier.
fn spawn_delay_line(
    device: Arc<SyncDevice>,
    (delay, jitter, reordered): (Arc<Mutex<Duration>>, Arc<AtomicU64>, Arc<AtomicU64>),
    stop: Arc<InterruptEvent>,
) -> Vec<JoinHandle<()>> {
    let (held, release) = mpsc::channel();
    let reader = {
        let device = device.clone();
        std::thread::spawn(move || read_packets(&device, (&delay, &jitter), &stop, held))
    };
    let writer = std::thread::spawn(move || write_packets(&device, release, &reordered));
    vec![reader, writer]
}

fn read_packets(
    device: &SyncDevice,
    (delay, jitter): (&Mutex<Duration>, &AtomicU64),
    stop: &InterruptEvent,
    held: Sender<Held>,
) {
    let mut buf = vec![0u8; 65536];
    for seq in 0.. {
        let Ok(n) = device.recv_intr(&mut buf, stop) else { return };
        let delay = *delay.lock().unwrap();
        // Uniform in [1 - jitter, 1 + jitter] x delay.
        let spread = jitter.load(Ordering::Relaxed) as f64 / 1000.0;
        let hold = delay.mul_f64(1.0 - spread + rand::random::<f64>() * 2.0 * spread);
        if held.send((Instant::now() + hold, seq, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

fn write_packets(device: &SyncDevice, release: Receiver<Held>, reordered: &AtomicU64) {
    let mut queue: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut last_seq = 0;
    loop {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Reverse((_, seq, packet)) = queue.pop().unwrap();
            if seq < last_seq {
                reordered.fetch_add(1, Ordering::Relaxed);
            }
            last_seq = last_seq.max(seq);
            // A full device queue drops the packet, as a congested link would.
            let _ = device.send(&packet);
        }
        let wait = queue.peek().map_or(Duration::from_millis(100), |Reverse((at, _, _))| *at - now);
        match release.recv_timeout(wait) {
            Ok(packet) => queue.push(Reverse(packet)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
