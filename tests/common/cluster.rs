//! A private Redis Cluster: six cluster-enabled `redis-server` processes (three primaries,
//! one replica each) on free ports, joined with `redis-cli --cluster create`, killed on drop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::RedisServer;

/// How long a node may be unreachable before the cluster fails it over: short, so a
/// failover test takes a few seconds.
const NODE_TIMEOUT_MS: &str = "1000";

pub struct RedisCluster {
    nodes: Vec<Option<RedisServer>>,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster (3 primaries, 1 replica each) and waits until
    /// every node reports `cluster_state:ok` and knows all six nodes.
    pub fn start() -> Self {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "{dir}/nodes.conf",
            "--cluster-node-timeout",
            NODE_TIMEOUT_MS,
            // A replica may take over however long it was cut off from its primary.
            "--cluster-replica-validity-factor",
            "0",
        ];
        let nodes: Vec<RedisServer> = (0..6).map(|_| RedisServer::start_with(&args)).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self {
            nodes: nodes.into_iter().map(Some).collect(),
        };
        cluster.wait_until_ok(Duration::from_secs(10));
        cluster
    }

    /// `redis://127.0.0.1:{port}` of every node still running.
    pub fn urls(&self) -> Vec<String> {
        self.alive().map(|(_, n)| n.url()).collect()
    }

    fn alive(&self) -> impl Iterator<Item = (usize, &RedisServer)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    pub fn node(&self, i: usize) -> &RedisServer {
        self.nodes[i].as_ref().expect("node running")
    }

    /// The indexes of the running nodes that are primaries serving slots.
    pub fn primaries(&self) -> Vec<usize> {
        self.alive()
            .filter(|(_, n)| {
                let role: Vec<redis::Value> = n.cmd(&["ROLE"]);
                matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
                    && owns_slots(n)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Kills node `i` (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill();
        }
    }

    /// Waits until every running node says `cluster_state:ok` with all slots served by
    /// running primaries.
    pub fn wait_until_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let primaries = self.primaries();
            let ok = self.alive().all(|(_, n)| {
                let info: String = n.cmd(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            }) && primaries.len() == 3;
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {within:?}: {}",
                self.alive()
                    .map(|(_, n)| n.cmd::<String>(&["CLUSTER", "NODES"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the running primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> usize {
        let any = self.alive().next().expect("a running node").1;
        let slot: i64 = any.cmd(&["CLUSTER", "KEYSLOT", key]);
        self.primaries()
            .into_iter()
            .find(|&i| serves_slot(self.node(i), slot))
            .expect("a primary serves the slot")
    }
}

/// Whether a node serves any slot, from its own line of `CLUSTER NODES`.
fn owns_slots(node: &RedisServer) -> bool {
    own_line(node).split(' ').nth(8).is_some()
}

fn serves_slot(node: &RedisServer, slot: i64) -> bool {
    own_line(node).split(' ').skip(8).any(|range| {
        let mut ends = range.split('-').map(|s| s.parse::<i64>().unwrap_or(-1));
        let start = ends.next().unwrap_or(-1);
        let end = ends.next().unwrap_or(start);
        (start..=end).contains(&slot)
    })
}

fn own_line(node: &RedisServer) -> String {
    let nodes: String = node.cmd(&["CLUSTER", "NODES"]);
    nodes
        .lines()
        .find(|l| l.contains("myself"))
        .unwrap_or_default()
        .to_owned()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            node.kill();
        }
    }
}
