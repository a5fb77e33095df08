//! Binding and serving an OpenAPI service the same way in every Overfly API: the document at
//! `/openapi.json`, Swagger UI at `/docs`, one span per request, and problem+json for every
//! error, with a graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::{EndpointExt, Route, Server};
use poem_openapi::{OpenApi, OpenApiService};

/// A listener bound to its address (port 0 picks a free port; `local_addr` tells which).
pub struct Bound {
    acceptor: TcpAcceptor,
    pub local_addr: SocketAddr,
}

pub async fn bind(addr: SocketAddr) -> io::Result<Bound> {
    let acceptor = TcpListener::bind(addr.to_string())
        .into_acceptor()
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    let local_addr = acceptor
        .local_addr()
        .first()
        .and_then(|addr| addr.as_socket_addr().copied())
        .ok_or_else(|| io::Error::other("listener has no socket address"))?;
    Ok(Bound {
        acceptor,
        local_addr,
    })
}

/// Serves `service` until `shutdown` completes, then drains requests for up to 10 s.
pub async fn serve<T: OpenApi + 'static>(
    bound: Bound,
    service: OpenApiService<T, ()>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let service = service.server(format!("http://{}", bound.local_addr));
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    let route = Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", service)
        .around(crate::trace::span_per_request)
        .catch_all_error(crate::problem::catch_all);
    tracing::info!(addr = %bound.local_addr, "listening");
    Server::new_with_acceptor(bound.acceptor)
        .run_with_graceful_shutdown(route, shutdown, Some(Duration::from_secs(10)))
        .await
}
