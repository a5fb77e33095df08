//! Wiring: builds the HTTP application, the relay and the scheduler from a `Config`, binds the listener
//! (port 0 picks a free port; `local_addr` tells which), and runs until shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use overfly_domain::job::JobServices;
use overfly_http::server::Bound;
use poem_openapi::OpenApiService;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::api::CommandApi;
use crate::bus::CommandBus;
use crate::config::Config;
use crate::relay::Relay;
use crate::scheduler::Scheduler;

pub struct Application {
    bound: Bound,
    bus: Arc<CommandBus>,
    nats: async_nats::Client,
    relay: Option<Relay>,
    scheduler: Option<Scheduler>,
}

pub fn openapi(api: CommandApi) -> OpenApiService<CommandApi, ()> {
    OpenApiService::new(api, "Overfly command API", env!("CARGO_PKG_VERSION")).description(
        "Write side of Overfly: submit and steer jobs, executor registration and run \
             reports. Every command answers with the aggregate's new version and the global \
             position of its last event.",
    )
}

/// The OpenAPI document, rendered without any connection (for `openapi` and the drift test).
/// Call it inside a Tokio runtime (the lazy pool needs one, though it never connects).
pub fn openapi_json() -> String {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/unused")
        .expect("a static URL parses");
    let bus = Arc::new(CommandBus::new(
        pool,
        JobServices::default(),
        Arc::default(),
    ));
    openapi(CommandApi { bus, nats: None }).spec()
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
        let nats = overfly_infra::nats::connect(&config.nats.nats_url, "overfly-command").await?;
        Self::build_with(config, pool, nats).await
    }

    pub async fn build_with(
        config: &Config,
        pool: PgPool,
        nats: async_nats::Client,
    ) -> anyhow::Result<Self> {
        let committed = Arc::new(Notify::new());
        let scheduled = Arc::new(Notify::new());
        let bus = Arc::new(
            CommandBus::new(pool.clone(), config.job_services(), committed.clone())
                .with_listener(scheduled.clone()),
        );
        let scheduler = config
            .scheduler_enabled
            .then(|| Scheduler::new(pool.clone(), bus.clone(), config.scheduler(), scheduled));
        let relay = config
            .relay_enabled
            .then(|| Relay::new(pool, nats.clone(), config.relay.clone(), committed));
        let bound = overfly_http::server::bind(config.addr).await?;
        Ok(Self {
            bound,
            bus,
            nats,
            relay,
            scheduler,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.bound.local_addr
    }

    /// Serves until `shutdown` completes, then drains requests for up to 10 s.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        // Aborted when this future ends or is dropped: the relay never outlives its app.
        let _relay = self
            .relay
            .map(|relay| AbortOnDrop(tokio::spawn(relay.run())));
        let _scheduler = self
            .scheduler
            .map(|scheduler| AbortOnDrop(tokio::spawn(scheduler.run())));
        let service = openapi(CommandApi {
            bus: self.bus,
            nats: Some(self.nats),
        });
        overfly_http::server::serve(self.bound, service, shutdown)
            .await
            .context("HTTP server")
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
