//! Wiring: builds the read API from a `Config`, binds the listener (port 0 picks a free
//! port), and runs until shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::{EndpointExt, Route, Server};
use poem_openapi::OpenApiService;

use crate::api::QueryApi;
use crate::config::Config;

pub fn openapi(api: QueryApi) -> OpenApiService<QueryApi, ()> {
    OpenApiService::new(api, "Overfly query API", env!("CARGO_PKG_VERSION")).description(
        "Read side of Overfly: jobs and runs from the read models (with read-your-writes via \
         `min_position`), and the audit history of any job or executor from the event store.",
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
    })
    .spec()
}

pub struct Application {
    acceptor: TcpAcceptor,
    api: QueryApi,
    local_addr: SocketAddr,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let pool = overfly_infra::db::connect(
            &config.database_url,
            config.db_pool_size,
            Duration::from_secs(30),
        )
        .await?;
        overfly_infra::db::migrate(&pool).await?;
        let acceptor = TcpListener::bind(config.addr.to_string())
            .into_acceptor()
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let local_addr = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().copied())
            .context("listener has no socket address")?;
        let api = QueryApi {
            pool,
            read_your_writes_wait: config.read_your_writes_wait(),
        };
        Ok(Self {
            acceptor,
            api,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let service = openapi(self.api).server(format!("http://{}", self.local_addr));
        let spec = service.spec_endpoint();
        let docs = service.swagger_ui();
        let route = Route::new()
            .at("/openapi.json", spec)
            .nest("/docs", docs)
            .nest("/", service)
            .around(overfly_http::trace::span_per_request)
            .catch_all_error(overfly_http::problem::catch_all);
        tracing::info!(addr = %self.local_addr, "query API listening");
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(route, shutdown, Some(Duration::from_secs(10)))
            .await
            .context("HTTP server")
    }
}
