//! The proxy's configuration: built-in defaults, then an optional TOML file, then environment
//! variables. Every mistake is refused at start with where it is (the file's line, or the
//! variable's name) and why.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Method, Uri};
use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A configuration that was refused: `where` (`proxy.toml:12`, `UPSTREAM`) and why.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Everything the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// Peers whose `X-Forwarded-*` and `Forwarded` fields are kept (and extended); from any
    /// other peer they are removed before the cache or the upstream sees the request.
    pub trusted_proxies: Vec<Cidr>,
    pub log_requests: bool,
    /// Key entries on the client's `Host` (default false: one upstream, reached with its own
    /// `Host`, so every name of the proxy shares one entry per URL).
    pub key_host: bool,
    /// Responses are tagged with their first N path directories, for purges by prefix.
    pub prefix_purge_depth: usize,
    pub store: StoreConfig,
    pub key_prefix: String,
    pub limits: Limits,
    pub admin: Option<Admin>,
    /// The rule of paths no `[[rules]]` prefix matches (the `[cache]` table).
    pub default_rule: Rule,
    /// Longest prefix first.
    pub rules: Vec<Rule>,
}

/// The upstream's base URL: scheme (`http` or `https`) and authority.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub https: bool,
    pub authority: http::uri::Authority,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// Where the cache keeps its entries.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// In this process (moka), bounded by bytes.
    Memory {
        max_bytes: u64,
    },
    Redis {
        url: String,
    },
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    Cluster {
        nodes: Vec<String>,
    },
    /// An in-process L1 in front of a Redis store, invalidations over Redis pub/sub.
    Tiered {
        l2: Box<StoreConfig>,
        l1_ttl: Duration,
        l1_max_bytes: u64,
        /// The pub/sub connection's URL (the L2 server's, or `invalidation_url`).
        invalidation_url: String,
        channel: String,
    },
}

impl StoreConfig {
    /// Whether other proxy processes can share this store.
    pub fn is_shared(&self) -> bool {
        !matches!(self, StoreConfig::Memory { .. })
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    /// The largest body the cache records (larger ones are streamed, not stored).
    pub max_body_bytes: usize,
    pub pool_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: String,
}

/// What the cache does for the paths under `prefix`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub prefix: String,
    /// `false`: requests pass straight to the upstream.
    pub cache: bool,
    /// `None`: origin lifetimes only; `Some(ttl)`: the lifetime of responses without one.
    pub ttl: Option<Duration>,
    pub methods: Vec<Method>,
    pub sort_query: bool,
    pub ignore_query_params: Vec<String>,
    pub cookies: CookiePolicy,
    pub ignore_cookies: Vec<String>,
    pub key_on_cookies: Vec<String>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub refresh_ahead: Option<f64>,
    pub heuristic_freshness: f64,
    pub hit_for_miss: Duration,
    pub soft_timeout: Option<Duration>,
}

/// What a request with a `Cookie` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookiePolicy {
    /// Straight to the upstream, not cached (the default: cookies are usually personal).
    Bypass,
    /// Cached as if it had none (for paths whose answers never depend on cookies).
    Ignore,
}

/// An address range (`10.0.0.0/8`, `::1`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or range (10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(b) if b <= max => b,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { net, bits })
    }
}

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Addr>,
    upstream: Option<UpstreamValue>,
    trusted_proxies: Option<Vec<CidrValue>>,
    log_requests: Option<bool>,
    key_host: Option<bool>,
    prefix_purge_depth: Option<usize>,
    store: Option<StoreFile>,
    limits: Option<LimitsFile>,
    admin: Option<AdminFile>,
    cache: Option<RuleFile>,
    #[serde(default)]
    rules: Vec<toml::Spanned<RuleFile>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    kind: Option<StoreKind>,
    url: Option<String>,
    sentinels: Option<Vec<String>>,
    master: Option<String>,
    nodes: Option<Vec<String>>,
    max_bytes: Option<u64>,
    tiered: Option<bool>,
    l1_ttl: Option<Dur>,
    l1_max_bytes: Option<u64>,
    invalidation_url: Option<String>,
    channel: Option<String>,
    key_prefix: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Memory,
    Redis,
    Sentinel,
    Cluster,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_connections: Option<usize>,
    connect_timeout: Option<Dur>,
    response_timeout: Option<Dur>,
    shutdown_timeout: Option<Dur>,
    header_read_timeout: Option<Dur>,
    max_body_bytes: Option<usize>,
    pool_idle_per_host: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    listen: Option<Addr>,
    token: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    prefix: Option<String>,
    cache: Option<bool>,
    ttl: Option<Dur>,
    methods: Option<Vec<MethodValue>>,
    sort_query: Option<bool>,
    ignore_query_params: Option<Vec<String>>,
    cookies: Option<CookieValue>,
    ignore_cookies: Option<Vec<String>>,
    key_on_cookies: Option<Vec<String>>,
    stale_while_revalidate: Option<Dur>,
    stale_if_error: Option<Dur>,
    refresh_ahead: Option<f64>,
    heuristic_freshness: Option<f64>,
    hit_for_miss: Option<Dur>,
    soft_timeout: Option<Dur>,
}

/// A duration: `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`, or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "expected a duration: a number of seconds or \"500ms\", \"30s\", \"5m\", \"1h\"",
            )
        })? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t).map(Dur).map_err(de::Error::custom),
        }
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (\"500ms\", \"30s\", \"5m\", \"1h\")"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        other => Err(format!(
            "{text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
        )),
    }
}

macro_rules! parsed_string {
    ($name:ident, $target:ty, $parse:expr) => {
        #[derive(Clone, Debug)]
        struct $name($target);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                let parse: fn(&str) -> Result<$target, String> = $parse;
                parse(&text).map($name).map_err(de::Error::custom)
            }
        }
    };
}

parsed_string!(Addr, SocketAddr, parse_addr);
parsed_string!(UpstreamValue, Upstream, parse_upstream);
parsed_string!(CidrValue, Cidr, |s| s.parse());
parsed_string!(MethodValue, Method, |s| {
    Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{s:?} is not an HTTP method"))
});
parsed_string!(CookieValue, CookiePolicy, |s| match s {
    "bypass" => Ok(CookiePolicy::Bypass),
    "ignore" => Ok(CookiePolicy::Ignore),
    _ => Err(format!("cookies = {s:?}: use \"bypass\" or \"ignore\"")),
});

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not an address to listen on (\"127.0.0.1:8080\", \"[::]:80\")")
    })
}

/// `http://host[:port]` or `https://host[:port]`, without a path.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let uri: Uri = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a URL (http://127.0.0.1:8000)"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "{s:?}: the upstream URL starts with http:// or https://"
            ))
        }
    };
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("{s:?}: the upstream URL names no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{s:?}: credentials in the upstream URL are not supported"
        ));
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(format!(
            "{s:?}: the upstream URL has no path or query (requests keep their own)"
        ));
    }
    Ok(Upstream { https, authority })
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Where configuration comes from: a file's text (with its name, for messages) and the
/// environment.
pub struct Sources<'a> {
    pub file: Option<(&'a str, &'a str)>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// The default `[cache]` rule: origin lifetimes only, heuristic freshness as shared caches
/// do (10% of the time since `Last-Modified`), GET and HEAD, cookies bypass.
fn builtin_rule() -> Rule {
    Rule {
        prefix: "/".to_owned(),
        cache: true,
        ttl: None,
        methods: vec![Method::GET],
        sort_query: false,
        ignore_query_params: Vec::new(),
        cookies: CookiePolicy::Bypass,
        ignore_cookies: Vec::new(),
        key_on_cookies: Vec::new(),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        refresh_ahead: None,
        heuristic_freshness: 0.1,
        hit_for_miss: Duration::from_secs(120),
        soft_timeout: None,
    }
}

impl Config {
    /// Reads the file (if any), then the environment; refuses what is wrong with where and
    /// why.
    pub fn load(sources: Sources<'_>) -> Result<Config, ConfigError> {
        let (file, name, text) = match sources.file {
            Some((name, text)) => {
                let file: File = toml::from_str(text).map_err(|e| file_error(name, text, &e))?;
                (file, name, text)
            }
            None => (File::default(), "", ""),
        };
        let at = |span: std::ops::Range<usize>| format!("{name}:{}", line_of(text, span.start));
        let env = sources.env;
        let env_parse = |var: &str,
                         parse: &mut dyn FnMut(&str) -> Result<(), String>|
         -> Result<(), ConfigError> {
            match env(var) {
                Some(value) => parse(&value).map_err(|e| ConfigError(format!("{var}: {e}"))),
                None => Ok(()),
            }
        };

        let mut listen = file
            .listen
            .map_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)), |a| a.0);
        let mut upstream = file.upstream.map(|u| u.0);
        let mut trusted: Vec<Cidr> = file
            .trusted_proxies
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.0)
            .collect();
        let mut log_requests = file.log_requests.unwrap_or(false);
        env_parse("LISTEN", &mut |v| parse_addr(v).map(|a| listen = a))?;
        env_parse("UPSTREAM", &mut |v| {
            parse_upstream(v).map(|u| upstream = Some(u))
        })?;
        env_parse("TRUSTED_PROXIES", &mut |v| {
            trusted = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            Ok(())
        })?;
        env_parse("LOG_REQUESTS", &mut |v| {
            parse_bool(v).map(|b| log_requests = b)
        })?;
        let upstream = upstream.ok_or_else(|| {
            ConfigError(
                "no upstream: set UPSTREAM=http://host:port (or `upstream = \"...\"` in the \
                 config file)"
                    .to_owned(),
            )
        })?;

        let store_file = file.store.unwrap_or_default();
        let key_prefix = store_file
            .key_prefix
            .clone()
            .unwrap_or_else(|| "http-cache".to_owned());
        let store = store_config(store_file, env)?;

        let l = file.limits.unwrap_or_default();
        let mut limits = Limits {
            max_connections: l.max_connections.unwrap_or(10_000),
            connect_timeout: l.connect_timeout.map_or(Duration::from_secs(3), |d| d.0),
            response_timeout: l.response_timeout.map_or(Duration::from_secs(60), |d| d.0),
            shutdown_timeout: l.shutdown_timeout.map_or(Duration::from_secs(30), |d| d.0),
            header_read_timeout: l
                .header_read_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            max_body_bytes: l.max_body_bytes.unwrap_or(8 << 20),
            pool_idle_per_host: l.pool_idle_per_host.unwrap_or(256),
        };
        env_parse("MAX_CONNECTIONS", &mut |v| {
            v.trim()
                .parse()
                .map(|n| limits.max_connections = n)
                .map_err(|_| format!("{v:?} is not a number"))
        })?;
        if limits.max_connections == 0 {
            return Err(ConfigError(
                "limits.max_connections must be at least 1".to_owned(),
            ));
        }

        let admin_file = file.admin.unwrap_or_default();
        let mut admin_listen = admin_file.listen.map(|a| a.0);
        let mut token = admin_file.token;
        env_parse("ADMIN_LISTEN", &mut |v| {
            parse_addr(v).map(|a| admin_listen = Some(a))
        })?;
        if let Some(t) = env("ADMIN_TOKEN") {
            token = Some(t);
        }
        let admin = match (admin_listen, token) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError(
                    "the admin listener needs a token: set ADMIN_TOKEN (or admin.token)".to_owned(),
                ))
            }
            (Some(_), Some(t)) if t.len() < 16 => {
                return Err(ConfigError(
                    "the admin token must be at least 16 characters long".to_owned(),
                ))
            }
            (Some(listen), Some(token)) => Some(Admin { listen, token }),
        };

        let default_rule = match file.cache {
            Some(cache) => {
                if cache.prefix.is_some() {
                    return Err(ConfigError(format!(
                        "{name}: [cache] applies to every path: `prefix` belongs in [[rules]]"
                    )));
                }
                merge_rule(builtin_rule(), &cache)
            }
            None => builtin_rule(),
        };
        let mut rules = Vec::new();
        for spanned in file.rules {
            let where_ = at(spanned.span());
            let rule = spanned.into_inner();
            let Some(prefix) = rule.prefix.clone() else {
                return Err(ConfigError(format!(
                    "{where_}: a [[rules]] entry needs a `prefix`"
                )));
            };
            if !prefix.starts_with('/') {
                return Err(ConfigError(format!(
                    "{where_}: prefix {prefix:?} must start with '/'"
                )));
            }
            if rules.iter().any(|r: &Rule| r.prefix == prefix) {
                return Err(ConfigError(format!(
                    "{where_}: prefix {prefix:?} has two rules"
                )));
            }
            let mut merged = merge_rule(default_rule.clone(), &rule);
            merged.prefix = prefix;
            rules.push(merged);
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        Ok(Config {
            listen,
            upstream,
            trusted_proxies: trusted,
            log_requests,
            key_host: file.key_host.unwrap_or(false),
            prefix_purge_depth: file.prefix_purge_depth.unwrap_or(4).min(16),
            store,
            key_prefix,
            limits,
            admin,
            default_rule,
            rules,
        })
    }

    /// The rule for `path`: the longest matching prefix, else `[cache]`.
    pub fn rule_index(&self, path: &str) -> Option<usize> {
        self.rules.iter().position(|r| path.starts_with(&r.prefix))
    }
}

fn merge_rule(mut rule: Rule, file: &RuleFile) -> Rule {
    if let Some(v) = file.cache {
        rule.cache = v;
    }
    if let Some(v) = file.ttl {
        // `ttl = 0` is "origin lifetimes only", as when it is absent.
        rule.ttl = (v.0 > Duration::ZERO).then_some(v.0);
    }
    if let Some(v) = &file.methods {
        rule.methods = v.iter().map(|m| m.0.clone()).collect();
    }
    if let Some(v) = file.sort_query {
        rule.sort_query = v;
    }
    if let Some(v) = &file.ignore_query_params {
        rule.ignore_query_params = v.clone();
    }
    if let Some(v) = &file.cookies {
        rule.cookies = v.0;
    }
    if let Some(v) = &file.ignore_cookies {
        rule.ignore_cookies = v.clone();
    }
    if let Some(v) = &file.key_on_cookies {
        rule.key_on_cookies = v.clone();
    }
    if let Some(v) = file.stale_while_revalidate {
        rule.stale_while_revalidate = v.0;
    }
    if let Some(v) = file.stale_if_error {
        rule.stale_if_error = v.0;
    }
    if let Some(v) = file.refresh_ahead {
        rule.refresh_ahead = (v > 0.0 && v < 1.0).then_some(v);
    }
    if let Some(v) = file.heuristic_freshness {
        rule.heuristic_freshness = v;
    }
    if let Some(v) = file.hit_for_miss {
        rule.hit_for_miss = v.0;
    }
    if let Some(v) = file.soft_timeout {
        rule.soft_timeout = Some(v.0);
    }
    rule
}

fn store_config(
    file: StoreFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StoreConfig, ConfigError> {
    let mut kind = file.kind;
    let mut url = file.url;
    if let Some(u) = env("REDIS_URL") {
        url = Some(u);
    }
    if let Some(k) = env("STORE") {
        kind = Some(match k.trim() {
            "memory" => StoreKind::Memory,
            "redis" => StoreKind::Redis,
            "sentinel" => StoreKind::Sentinel,
            "cluster" => StoreKind::Cluster,
            other => {
                return Err(ConfigError(format!(
                    "STORE: {other:?} is not a store (memory, redis, sentinel or cluster)"
                )))
            }
        });
    }
    let mut tiered = file.tiered.unwrap_or(false);
    if let Some(t) = env("STORE_TIERED") {
        tiered = parse_bool(&t).map_err(|e| ConfigError(format!("STORE_TIERED: {e}")))?;
    }
    // A Redis URL alone says "Redis".
    let kind = kind.unwrap_or(if url.is_some() {
        StoreKind::Redis
    } else {
        StoreKind::Memory
    });
    let need = |what: Option<Vec<String>>, field: &str| -> Result<Vec<String>, ConfigError> {
        match what {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ConfigError(format!(
                "store.{field}: required for this store kind"
            ))),
        }
    };
    let l2 = match kind {
        StoreKind::Memory => {
            if tiered {
                return Err(ConfigError(
                    "store.tiered: two tiers need a Redis store as the second tier".to_owned(),
                ));
            }
            return Ok(StoreConfig::Memory {
                max_bytes: file.max_bytes.unwrap_or(256 << 20),
            });
        }
        StoreKind::Redis => StoreConfig::Redis {
            url: url.clone().ok_or_else(|| {
                ConfigError("store.url (or REDIS_URL): required for Redis".to_owned())
            })?,
        },
        StoreKind::Sentinel => StoreConfig::Sentinel {
            sentinels: need(file.sentinels, "sentinels")?,
            master: file
                .master
                .ok_or_else(|| ConfigError("store.master: required for Sentinel".to_owned()))?,
        },
        StoreKind::Cluster => StoreConfig::Cluster {
            nodes: need(file.nodes, "nodes")?,
        },
    };
    if !tiered {
        return Ok(l2);
    }
    let invalidation_url = file.invalidation_url.or(url).ok_or_else(|| {
        ConfigError(
            "store.invalidation_url: two tiers need a Redis URL for invalidations".to_owned(),
        )
    })?;
    Ok(StoreConfig::Tiered {
        l2: Box::new(l2),
        l1_ttl: file.l1_ttl.map_or(Duration::from_secs(1), |d| d.0),
        l1_max_bytes: file.l1_max_bytes.unwrap_or(64 << 20),
        invalidation_url,
        channel: file
            .channel
            .unwrap_or_else(|| "tower-redis-cache-proxy".to_owned()),
    })
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn file_error(name: &str, text: &str, error: &toml::de::Error) -> ConfigError {
    let reason = error.message().trim();
    match error.span() {
        Some(span) => ConfigError(format!("{name}:{}: {reason}", line_of(text, span.start))),
        None => ConfigError(format!("{name}: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Config::load(Sources {
            file: file.map(|text| ("proxy.toml", text)),
            env: &lookup,
        })
    }

    #[test]
    fn zero_config_is_the_embedded_store_in_front_of_upstream() {
        let config = load(None, &[("UPSTREAM", "http://127.0.0.1:8000")]).unwrap();
        assert_eq!(config.upstream.to_string(), "http://127.0.0.1:8000");
        assert!(matches!(config.store, StoreConfig::Memory { .. }));
        assert!(config.admin.is_none());
        assert_eq!(config.default_rule.ttl, None);
        assert_eq!(config.default_rule.heuristic_freshness, 0.1);
    }

    #[test]
    fn without_an_upstream_start_is_refused_with_what_to_set() {
        let error = load(None, &[]).unwrap_err().to_string();
        assert!(error.contains("UPSTREAM"), "{error}");
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_reason() {
        let text = "listen = \"127.0.0.1:8080\"\nupstream = \"http://a:1\"\n\n[limits]\nresponse_timeout = \"3 fortnights\"\n";
        let error = load(Some(text), &[]).unwrap_err().to_string();
        assert!(error.starts_with("proxy.toml:5:"), "{error}");
        assert!(error.contains("unknown unit"), "{error}");

        let error = load(Some("upstream = \"http://a:1\"\nlissen = \"x\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("proxy.toml:2:") && error.contains("lissen"),
            "{error}"
        );

        let error = load(Some("upstream = \"ftp://a\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("proxy.toml:1:") && error.contains("http://"),
            "{error}"
        );

        let text =
            "upstream = \"http://a:1\"\n[[rules]]\nprefix = \"/a\"\n\n[[rules]]\nprefix = \"b\"\n";
        let error = load(Some(text), &[]).unwrap_err().to_string();
        assert!(
            error.starts_with("proxy.toml:5:") && error.contains("start with '/'"),
            "{error}"
        );
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let text =
            "upstream = \"http://a:1\"\nlisten = \"127.0.0.1:1\"\n[store]\nkind = \"memory\"\n";
        let config = load(
            Some(text),
            &[
                ("UPSTREAM", "https://b:2"),
                ("LISTEN", "0.0.0.0:9"),
                ("STORE", "redis"),
                ("REDIS_URL", "redis://r:6379"),
            ],
        )
        .unwrap();
        assert_eq!(config.upstream.to_string(), "https://b:2");
        assert_eq!(config.listen, "0.0.0.0:9".parse().unwrap());
        assert_eq!(
            config.store,
            StoreConfig::Redis {
                url: "redis://r:6379".to_owned()
            }
        );
        let error = load(Some(text), &[("LISTEN", "nope")])
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("LISTEN:"), "{error}");
    }

    #[test]
    fn rules_inherit_the_cache_table_and_match_the_longest_prefix() {
        let text = "upstream = \"http://a:1\"\n[cache]\nstale_if_error = \"1h\"\n\
                    [[rules]]\nprefix = \"/api/\"\nttl = \"30s\"\n\
                    [[rules]]\nprefix = \"/api/private/\"\ncache = false\n";
        let config = load(Some(text), &[]).unwrap();
        let api = &config.rules[config.rule_index("/api/x").unwrap()];
        assert_eq!(
            (api.ttl, api.stale_if_error),
            (Some(Duration::from_secs(30)), Duration::from_secs(3600))
        );
        assert!(!config.rules[config.rule_index("/api/private/x").unwrap()].cache);
        assert_eq!(config.rule_index("/other"), None);
    }

    #[test]
    fn the_admin_listener_needs_a_long_token() {
        let error = load(
            None,
            &[("UPSTREAM", "http://a:1"), ("ADMIN_LISTEN", "127.0.0.1:0")],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ADMIN_TOKEN"), "{error}");
    }

    #[test]
    fn ranges_contain_their_addresses_only() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()) && !one.contains("::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
