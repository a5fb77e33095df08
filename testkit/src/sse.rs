//! A minimal Server-Sent Events client over a streaming HTTP response (what a browser's
//! `EventSource` does, without the automatic reconnect: tests reconnect themselves).

use std::time::Duration;

/// One SSE message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Message {
    /// `id:` as a stream sequence.
    pub fn sequence(&self) -> u64 {
        self.id
            .as_deref()
            .expect("the message has an id")
            .parse()
            .expect("the id is a stream sequence")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
}

pub struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    /// GETs `url` (with `Last-Event-ID` when given) and checks it is an event stream.
    pub async fn connect(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        let mut request = http.get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("the feed answers");
        assert_eq!(response.status(), 200, "{url}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"),
            "{url} is not an event stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next message (comments skipped); `None` when the server closed the stream or
    /// nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Message> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut message = Message {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        message.id = Some(v.trim().to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        message.event = Some(v.trim().to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        message.data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    return Some(message);
                }
                continue;
            }
            match tokio::time::timeout(wait, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Every message until the server closes the stream; panics if it stays open with
    /// nothing to say for `wait`.
    pub async fn to_end(&mut self, wait: Duration) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            match tokio::time::timeout(wait, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(_) => break,
                Err(_) => panic!("the feed stayed open with nothing to send for {wait:?}"),
            }
            while let Some(message) = self.next(Duration::ZERO).await {
                messages.push(message);
            }
        }
        while let Some(message) = self.next(Duration::ZERO).await {
            messages.push(message);
        }
        messages
    }
}
