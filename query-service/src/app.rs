//! Wiring: builds the read API from a `Config`, binds the listener (port 0 picks a free
//! port), and runs until shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use overfly_http::server::Bound;
use poem_openapi::OpenApiService;

use crate::api::QueryApi;
use crate::config::Config;

pub fn openapi(api: QueryApi) -> OpenApiService<QueryApi, ()> {
    OpenApiService::new(api, "Overfly query API", env!("CARGO_PKG_VERSION")).description(
        "Read side of Overfly: jobs and runs from the read models (with read-your-writes via \
         `min_position`), executors and their GPUs (which run holds each), and the audit history of any job or \
         executor from the event store.",
    )
}

/// The OpenAPI document, rendered without any connection. Call it inside a Tokio runtime.
pub fn openapi_json() -> String {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/unused")
        .expect("a static URL parses");
    openapi(QueryApi {
        pool,
        read_your_writes_wait: Duration::ZERO,
        policy: overfly_domain::scheduler::Policy::default(),
        feeds: None,
    })
    .spec()
}

pub struct Application {
    bound: Bound,
    api: QueryApi,
    /// Set when the server shuts down: every live feed ends.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let pool = overfly_infra::db::connect(
            &config.postgres.database_url,
            config.db_pool_size,
            Duration::from_secs(30),
        )
        .await?;
        overfly_infra::db::migrate(&pool).await?;
        let bound = overfly_http::server::bind(config.addr).await?;
        let (closing, closed) = tokio::sync::watch::channel(false);
        let nats = overfly_infra::nats::connect(&config.nats.nats_url, "overfly-query").await?;
        let feeds =
            crate::feeds::Feeds::start(nats, config.stream.clone(), config.feed_buffer, closed);
        let api = QueryApi {
            pool,
            read_your_writes_wait: config.read_your_writes_wait(),
            policy: config.policy(),
            feeds: Some(feeds),
        };
        Ok(Self {
            bound,
            api,
            closing,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.bound.local_addr
    }

    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let closing = self.closing;
        // Feeds end first, so the graceful shutdown is not held open by them.
        let shutdown = async move {
            shutdown.await;
            let _ = closing.send(true);
        };
        overfly_http::server::serve(self.bound, openapi(self.api), shutdown)
            .await
            .context("HTTP server")
    }
}
