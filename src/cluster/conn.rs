//! The Redis connection: URL and password to connection info, and one connect attempt with
//! a deadline. RESP3 throughout (push frames for pub/sub on the same multiplexed connection).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

use crate::config::ClusterConfig;

/// Connection info for `cfg.redis_url`, with the password from `redis_password_file` when
/// given (`password` overrides it; `None` reads the file). Errors are one line, never
/// carrying the password.
pub fn connection_info(
    cfg: &ClusterConfig,
    password: Option<&str>,
) -> Result<ConnectionInfo, String> {
    let info = cfg
        .redis_url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("not a Redis URL ({})", e.category()))?;
    let mut redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let from_file = match password {
        Some(p) => Some(p.to_string()),
        None => cfg.redis_password().map_err(|e| e.to_string())?,
    };
    if let Some(p) = from_file {
        redis = redis.set_password(p);
    }
    Ok(info.set_redis_settings(redis))
}

/// `redis_url` without any password, for logs and `tern cluster status`.
pub fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// One connection attempt bounded by `timeout` (connect and each response).
pub async fn connect(
    info: &ConnectionInfo,
    timeout: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(info.clone())?;
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_passwords_are_redacted() {
        let mut c = ClusterConfig {
            redis_url: "redis://:hunter2@10.0.0.5:6380/2".into(),
            ..ClusterConfig::default()
        };
        let i = connection_info(&c, None).unwrap();
        assert_eq!(i.redis_settings().password(), Some("hunter2"));
        assert_eq!(i.redis_settings().db(), 2);
        assert_eq!(redacted_url(&c.redis_url), "redis://***@10.0.0.5:6380/2");
        c.redis_url = "unix:/run/redis/redis.sock".into();
        assert!(connection_info(&c, None).is_ok());
        c.redis_url = "rediss://redis.internal:6380".into();
        assert!(connection_info(&c, Some("pw")).is_ok());
        c.redis_url = "redis://".into();
        assert!(connection_info(&c, None).is_err());
    }
}
