//! A TCP forwarder between a service and its NATS server that a test can cut, to make a real
//! network partition of one process: its connections are severed and new ones refused until the
//! test heals it, while every other client keeps talking to the same server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A forwarder listening on 127.0.0.1 that relays every connection to `upstream`.
pub struct CuttableLink {
    /// `host:port` the service should connect to instead of the upstream.
    pub addr: String,
    down: Arc<AtomicBool>,
    links: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CuttableLink {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> CuttableLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let down = Arc::new(AtomicBool::new(false));
        let links: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_string();
        let accept = {
            let (down, links) = (down.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let link = tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                    links.lock().expect("links").push(link);
                }
            })
        };
        CuttableLink {
            addr,
            down,
            links,
            accept,
        }
    }

    /// Severs every relayed connection and refuses new ones until [`CuttableLink::heal`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    /// Accepts and relays connections again.
    pub fn heal(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
