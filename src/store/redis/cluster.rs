//! What only a Redis Cluster needs (feature `cluster`): the addresses of its primaries, and
//! one command routed to one of them, for what names no key (`SCAN`, `INFO`) and so has to
//! visit every primary in turn.

use ::redis::{FromRedisValue, Value};

use super::connection::RedisStore;
use super::source::Conn;
use crate::{Error, ErrorKind, Result};

impl RedisStore {
    /// The addresses of the cluster's primaries, from `CLUSTER SLOTS` (sorted, without
    /// duplicates).
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn primaries(&self) -> Result<Vec<(String, u16)>> {
        let ranges: Vec<Vec<Value>> = self.query(::redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let mut primaries: Vec<(String, u16)> = ranges
            .iter()
            .filter_map(|range| match range.get(2)? {
                Value::Array(node) => {
                    let host = String::from_redis_value(node.first()?.clone()).ok()?;
                    let port = u16::from_redis_value(node.get(1)?.clone()).ok()?;
                    Some((host, port))
                }
                _ => None,
            })
            .collect();
        primaries.sort();
        primaries.dedup();
        Ok(primaries)
    }

    /// Runs one command on the cluster node at `node` (a `SCAN` step, which names no key),
    /// bounded by the operation timeout.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn query_node<T: FromRedisValue>(
        &self,
        node: &(String, u16),
        cmd: &::redis::Cmd,
    ) -> Result<T> {
        use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.0.clone(),
            port: node.1,
        });
        let routing = &routing;
        let value = self
            .with_conn(|conn| async move {
                match conn {
                    Conn::Cluster(mut conn) => {
                        conn.route_command(cmd.clone(), routing.clone()).await
                    }
                    // Not a cluster: the only node there is.
                    mut conn => cmd.query_async::<Value>(&mut conn).await,
                }
            })
            .await?;
        T::from_redis_value(value).map_err(|e| {
            Error::new(ErrorKind::Backend, "unexpected reply from Redis").with_source(e)
        })
    }
}
