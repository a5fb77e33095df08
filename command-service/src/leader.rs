//! One leader at a time for the relay and the scheduler: a Postgres session advisory lock,
//! held on the connection the leader then works on (losing the connection loses the lock).

use std::time::Duration;

use sqlx::PgConnection;
use sqlx::PgPool;

/// Waits until this process holds advisory lock `key` (logging once that it stands by while
/// another `what` holds it); the connection holding it.
pub(crate) async fn acquire(pool: &PgPool, key: i64, what: &str) -> anyhow::Result<PgConnection> {
    let mut conn = pool.acquire().await?.detach();
    let mut standing_by = false;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut conn)
        .await?
    {
        if !standing_by {
            tracing::info!("another {what} holds the lock; standing by");
            standing_by = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::info!("{what} is the leader");
    Ok(conn)
}
