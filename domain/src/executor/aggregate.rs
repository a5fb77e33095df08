use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ExecutorCommand, ExecutorError, ExecutorEvent, GpuInfo};
use crate::validate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorState {
    Registered,
    Active,
    Draining,
    Lost,
    Gone,
}

/// The state of one executor, rebuilt from its events (snapshotted: heartbeats make long
/// histories).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Executor {
    pub state: Option<ExecutorState>,
    pub gpus: Vec<GpuInfo>,
    pub lease_s: u32,
    pub session: u32,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl Executor {
    fn state(&self) -> Result<ExecutorState, ExecutorError> {
        self.state.ok_or(ExecutorError::NotFound)
    }

    /// Commands that need a live session (heartbeat): refused when lost or gone.
    fn live(&self) -> Result<ExecutorState, ExecutorError> {
        match self.state()? {
            state @ (ExecutorState::Lost | ExecutorState::Gone) => {
                Err(ExecutorError::NotRegistered { state })
            }
            state => Ok(state),
        }
    }

    pub fn decide(&self, command: ExecutorCommand) -> Result<Vec<ExecutorEvent>, ExecutorError> {
        match command {
            ExecutorCommand::RegisterExecutor {
                executor_id,
                hostname,
                gpus,
                lease_s,
                at,
            } => {
                validate::token("executor_id", &executor_id).map_err(ExecutorError::Invalid)?;
                validate::text("hostname", &hostname, 255).map_err(ExecutorError::Invalid)?;
                validate::range("lease_s", lease_s, 1, 3600).map_err(ExecutorError::Invalid)?;
                GpuInfo::validate_inventory(&gpus).map_err(ExecutorError::Invalid)?;
                Ok(vec![ExecutorEvent::ExecutorRegistered {
                    executor_id,
                    hostname,
                    gpus,
                    lease_s,
                    session: self.session + 1,
                    at,
                }])
            }
            ExecutorCommand::Heartbeat { at } => {
                let state = self.live()?;
                // A late, older heartbeat never shortens the lease.
                let lease_expires_at = (at + Duration::seconds(i64::from(self.lease_s)))
                    .max(self.lease_expires_at.unwrap_or_default());
                let mut events = Vec::with_capacity(2);
                if state == ExecutorState::Registered {
                    events.push(ExecutorEvent::ExecutorActivated { at });
                }
                events.push(ExecutorEvent::ExecutorHeartbeat {
                    lease_expires_at,
                    at,
                });
                Ok(events)
            }
            ExecutorCommand::Drain { by, reason, at } => {
                match self.live()? {
                    ExecutorState::Draining => return Ok(vec![]),
                    ExecutorState::Registered | ExecutorState::Active => {}
                    state => return Err(ExecutorError::NotRegistered { state }),
                }
                validate::text("by", &by, 1024).map_err(ExecutorError::Invalid)?;
                validate::text("reason", &reason, 1024).map_err(ExecutorError::Invalid)?;
                Ok(vec![ExecutorEvent::ExecutorDraining { by, reason, at }])
            }
            ExecutorCommand::Deregister { reason, at } => {
                if self.state()? == ExecutorState::Gone {
                    return Ok(vec![]);
                }
                validate::text("reason", &reason, 1024).map_err(ExecutorError::Invalid)?;
                Ok(vec![ExecutorEvent::ExecutorDeregistered { reason, at }])
            }
            ExecutorCommand::MarkLost { at } => {
                match self.state()? {
                    ExecutorState::Lost => return Ok(vec![]),
                    ExecutorState::Gone => return Err(ExecutorError::Gone),
                    _ => {}
                }
                let lease_expired_at = self.lease_expires_at.unwrap_or_else(|| {
                    // Registered but never heartbeated: the lease runs from registration.
                    self.registered_at_lease()
                });
                if at < lease_expired_at {
                    return Err(ExecutorError::LeaseNotExpired {
                        until: lease_expired_at,
                    });
                }
                Ok(vec![ExecutorEvent::ExecutorLost {
                    last_heartbeat_at: self.last_heartbeat_at,
                    lease_expired_at,
                    at,
                }])
            }
        }
    }

    fn registered_at_lease(&self) -> DateTime<Utc> {
        self.registered_at.unwrap_or_default() + Duration::seconds(i64::from(self.lease_s))
    }
}

impl Aggregate for Executor {
    const TYPE: &'static str = "executor";
    type Command = ExecutorCommand;
    type Event = ExecutorEvent;
    type Error = ExecutorError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ExecutorEvent::ExecutorRegistered {
                gpus,
                lease_s,
                session,
                at,
                ..
            } => {
                self.state = Some(ExecutorState::Registered);
                self.gpus = gpus;
                self.lease_s = lease_s;
                self.session = session;
                self.registered_at = Some(at);
                self.last_heartbeat_at = None;
                self.lease_expires_at = None;
            }
            ExecutorEvent::ExecutorActivated { .. } => self.state = Some(ExecutorState::Active),
            ExecutorEvent::ExecutorHeartbeat {
                lease_expires_at,
                at,
            } => {
                self.last_heartbeat_at = Some(at);
                self.lease_expires_at = Some(lease_expires_at);
            }
            ExecutorEvent::ExecutorDraining { .. } => self.state = Some(ExecutorState::Draining),
            ExecutorEvent::ExecutorDeregistered { .. } => self.state = Some(ExecutorState::Gone),
            ExecutorEvent::ExecutorLost { .. } => self.state = Some(ExecutorState::Lost),
        }
    }
}
