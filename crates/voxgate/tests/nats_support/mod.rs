#![allow(dead_code)]
//! Test support: real `nats-server` processes (JetStream on) on 127.0.0.1, a single server or a
//! 3-node cluster, each in its own temp dir, that a test can kill (SIGKILL) and restart on the same
//! ports and store dirs. The binary comes from `scripts/deps nats` (or `VOXGATE_NATS_SERVER`).
//!
//! Servers are `std::process` children so that `Drop` can kill them synchronously; their output
//! goes to a log file in the temp dir, not to the test output.

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a started server may take to accept TCP connections.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// How long a cluster may take to elect a JetStream meta leader.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);
/// How long `js_ready` waits for a JetStream account info answer.
const JS_WAIT: Duration = Duration::from_secs(15);

/// The nats-server binary: `VOXGATE_NATS_SERVER` if set, else the one `scripts/deps nats` installs
/// under the workspace's `target/tools/nats/bin/`. Panics if it is missing.
pub fn nats_server_bin() -> PathBuf {
    let bin = match std::env::var_os("VOXGATE_NATS_SERVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/tools/nats/bin/nats-server"),
    };
    if !bin.is_file() {
        panic!(
            "nats-server not found at {}: run `scripts/deps nats` (installs nats-server >= 2.10 \
             there) or set VOXGATE_NATS_SERVER to a nats-server >= 2.10 binary",
            bin.display()
        );
    }
    bin
}

/// A directory under the system temp dir, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all listeners are held until every port is picked,
/// then dropped; another process could still take one before the server binds it).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn spawn(args: &[String], log: &Path) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open nats-server log");
    let err = out.try_clone().expect("clone log handle");
    Command::new(nats_server_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn nats-server")
}

/// The last lines of a log, for panic messages.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Blocks until 127.0.0.1:`port` accepts a TCP connection; panics after `PORT_WAIT` or if the
/// child exits first.
fn wait_port(port: u16, child: &mut Child, log: &Path) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nats-server exited ({status}) before listening on {addr}; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "nats-server did not listen on {addr} within {PORT_WAIT:?}; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill(); // SIGKILL on Unix
        let _ = c.wait();
    }
}

/// One nats-server with JetStream (file store in its temp dir) on 127.0.0.1.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> NatsServer {
        let dir = TempDir::new("voxgate-nats");
        fs::create_dir_all(dir.0.join("store")).expect("create store dir");
        let port = free_ports(1)[0];
        let mut server = NatsServer {
            port,
            child: None,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let args = vec![
            "-js".to_string(),
            "-sd".to_string(),
            self.store_dir().display().to_string(),
            "-a".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            self.port.to_string(),
        ];
        let log = self.log_path();
        let mut child = spawn(&args, &log);
        wait_port(self.port, &mut child, &log);
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// JetStream's store dir (kept across `kill`/`restart`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.0.join("store")
    }

    /// The server's stdout+stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.0.join("nats-server.log")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILLs the server and waits for it to exit (no-op if not running).
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts the server again on the same port and store dir (killing it first if it runs), and
    /// waits until it accepts connections. JetStream data written before survives.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    http_port: u16,
    child: Option<Child>,
}

/// Three nats-servers (n1, n2, n3) with JetStream, clustered on 127.0.0.1: each has its own client,
/// cluster-route and monitoring port, store dir, config file and log, and routes to the other two.
pub struct NatsCluster {
    nodes: Vec<Node>,
    cluster_name: String,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts all three nodes and waits until each accepts client connections. Call
    /// [`NatsCluster::wait_ready`] before using JetStream.
    pub fn start() -> NatsCluster {
        let dir = TempDir::new("voxgate-nats-cluster");
        let ports = free_ports(9);
        let nodes: Vec<Node> = (0..3)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client_port: ports[3 * i],
                cluster_port: ports[3 * i + 1],
                http_port: ports[3 * i + 2],
                child: None,
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            cluster_name: "voxgate-test".to_string(),
            dir,
        };
        for i in 0..3 {
            fs::create_dir_all(cluster.store_dir(i)).expect("create store dir");
            fs::write(cluster.config_path(i), cluster.config(i)).expect("write node config");
        }
        // Spawn all before waiting: no node needs the others to listen on its client port.
        for i in 0..3 {
            let child = spawn(
                &[
                    "-c".to_string(),
                    cluster.config_path(i).display().to_string(),
                ],
                &cluster.log_path(i),
            );
            cluster.nodes[i].child = Some(child);
        }
        for i in 0..3 {
            cluster.wait_node(i);
        }
        cluster
    }

    fn config(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| format!("    \"nats-route://127.0.0.1:{}\"", o.cluster_port))
            .collect();
        format!(
            "server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{client}\"\n\
             http: \"127.0.0.1:{http}\"\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n\
             cluster {{\n  name: \"{cluster}\"\n  listen: \"127.0.0.1:{route}\"\n  routes: [\n{routes}\n  ]\n}}\n",
            name = n.name,
            client = n.client_port,
            http = n.http_port,
            store = self.store_dir(i).display(),
            cluster = self.cluster_name,
            route = n.cluster_port,
            routes = routes.join("\n"),
        )
    }

    fn wait_node(&mut self, i: usize) {
        let port = self.nodes[i].client_port;
        let log = self.log_path(i);
        let child = self.nodes[i].child.as_mut().expect("node running");
        wait_port(port, child, &log);
    }

    /// Client URLs of all three nodes (running or not), in node order. Pass the Vec itself to
    /// `async_nats::connect`/`ConnectOptions::connect`: async-nats 0.51 parses a `&str` as a single
    /// URL and does not split a comma-separated list.
    pub fn urls(&self) -> Vec<String> {
        (0..3).map(|i| self.url(i)).collect()
    }

    /// Client URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Monitoring base URL of node `i`, e.g. `http://127.0.0.1:PORT` (serves `/jsz`, `/varz`, ...).
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].http_port)
    }

    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// `n1`, `n2` or `n3`: the `server_name` JetStream reports (e.g. as a stream's cluster leader).
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node with this `server_name`.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.dir.0.join(&self.nodes[i].name).join("store")
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.conf", self.nodes[i].name))
    }

    /// Node `i`'s stdout+stderr, appended across restarts.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.log", self.nodes[i].name))
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` and waits for it to exit (no-op if not running).
    pub fn kill(&mut self, i: usize) {
        kill_child(&mut self.nodes[i].child);
    }

    /// Starts node `i` again with the same config (ports, store dir), killing it first if it runs,
    /// and waits until it accepts client connections.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let child = spawn(
            &["-c".to_string(), self.config_path(i).display().to_string()],
            &self.log_path(i),
        );
        self.nodes[i].child = Some(child);
        self.wait_node(i);
    }

    /// Waits until every running node's `/jsz` reports the same JetStream meta leader and, on the
    /// leader, every other running node as a current meta replica. Panics after 30 s.
    pub async fn wait_ready(&self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let why = match self.meta_state(&http).await {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                panic!("NATS cluster not ready within {CLUSTER_WAIT:?}: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ok when the cluster is ready as `wait_ready` defines it, else why not.
    async fn meta_state(&self, http: &reqwest::Client) -> Result<(), String> {
        let running: Vec<usize> = (0..3).filter(|&i| self.is_running(i)).collect();
        let mut leader: Option<String> = None;
        let mut leader_meta = None;
        for &i in &running {
            let url = format!("{}/jsz", self.monitor_url(i));
            let jsz: serde_json::Value = http
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
                .json()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let meta = jsz
                .get("meta_cluster")
                .ok_or_else(|| format!("{}: no meta_cluster yet", self.nodes[i].name))?;
            let l = meta
                .get("leader")
                .and_then(|l| l.as_str())
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("{}: no meta leader yet", self.nodes[i].name))?;
            match &leader {
                Some(prev) if prev != l => {
                    return Err(format!("nodes disagree on the meta leader: {prev} vs {l}"))
                }
                _ => leader = Some(l.to_string()),
            }
            if l == self.nodes[i].name {
                leader_meta = Some(meta.clone());
            }
        }
        let leader = leader.ok_or("no node running")?;
        let meta = leader_meta.ok_or_else(|| format!("meta leader {leader} is not running"))?;
        let replicas = meta
            .get("replicas")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        for &i in &running {
            let name = &self.nodes[i].name;
            if *name == leader {
                continue;
            }
            let current = replicas.iter().any(|r| {
                r.get("name").and_then(|n| n.as_str()) == Some(name)
                    && r.get("current").and_then(|c| c.as_bool()) == Some(true)
            });
            if !current {
                return Err(format!(
                    "meta leader {leader} does not see {name} as current"
                ));
            }
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Connects to `url` and waits until a JetStream account info request succeeds; panics after 15 s.
pub async fn js_ready(url: &str) {
    let deadline = Instant::now() + JS_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
        {
            Ok(client) => {
                let mut js = async_nats::jetstream::new(client);
                js.set_timeout(Duration::from_secs(2));
                match js.query_account().await {
                    Ok(_) => return,
                    Err(e) => last = format!("account info: {e}"),
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("JetStream at {url} not ready within {JS_WAIT:?}: {last}");
}
