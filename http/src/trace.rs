//! W3C trace context: continue the caller's trace (`traceparent` header) and hand the current
//! span's context to the events a request records.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use poem::http::HeaderMap;
use poem::{Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// Middleware: one span per request, child of the caller's trace when it sent one.
pub async fn span_per_request<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(req.headers()))
    });
    let span = tracing::info_span!(
        "http request",
        http.method = %req.method(),
        http.path = %req.uri().path(),
        http.status = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    async move {
        let result = next.call(req).await.map(IntoResponse::into_response);
        let status = match &result {
            Ok(response) => response.status().as_u16(),
            Err(error) => error.status().as_u16(),
        };
        tracing::Span::current().record("http.status", status);
        result
    }
    .instrument(span)
    .await
}

/// The current span's context as a `traceparent` value, if it has a valid one.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MapInjector(&mut carrier));
    });
    carrier.remove("traceparent")
}
