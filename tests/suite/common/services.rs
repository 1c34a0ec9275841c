//! Local services shared by tests, benchmarks and `examples/compress_bench.rs`: a TCP
//! forwarder that counts the bytes it carries, and a sink that answers with a hash.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A forwarder on loopback to `target`; the bytes it carried, both ways together.
pub async fn counting_forwarder(target: SocketAddr) -> std::io::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let carried = Arc::new(AtomicU64::new(0));
    let count = carried.clone();
    tokio::spawn(async move {
        while let Ok((near, _)) = listener.accept().await {
            let Ok(far) = TcpStream::connect(target).await else { continue };
            let count = count.clone();
            tokio::spawn(async move {
                let (near_read, near_write) = near.into_split();
                let (far_read, far_write) = far.into_split();
                tokio::join!(pump(near_read, far_write, count.clone()), pump(far_read, near_write, count));
            });
        }
    });
    Ok((addr, carried))
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    count: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

/// Serves `listener` as a sink: reads everything a connection sends, then answers with
/// its SHA-256.
pub fn serve_hashing(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if stream.read_to_end(&mut all).await.is_ok() {
                    let digest: [u8; 32] = sha2::Sha256::digest(&all).into();
                    let _ = stream.write_all(&digest).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
}

/// A sink service answering each connection with the SHA-256 of what it got.
pub async fn hashing_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_hashing(listener);
    addr
}

/// Sends `payload` through `forward`, closes its side, and returns the hash answered.
pub async fn hash_through(forward: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(forward).await.unwrap();
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut answer = Vec::new();
    let receive = read.read_to_end(&mut answer);
    let (_, got) = tokio::join!(send, receive);
    got.unwrap();
    answer
}
