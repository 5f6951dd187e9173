//! Felix's external dataplane driver: Felix (or anything speaking its protocol) writes
//! `ToDataplane` envelopes on one pipe and reads `FromDataplane` on the other — fd 3 and 4
//! when Felix starts the driver. Messages go into [`PolicyDataplane`]; whenever the pipe has
//! no more queued, the state is applied (one transaction for a burst). The driver answers
//! with `ProcessStatusUpdate` every `status_interval` and a `WorkloadEndpointStatusUpdate`
//! (`up`, `down`) whenever an endpoint's status changes, `…Remove` when it goes. When Felix
//! closes its pipe the driver removes its chains and sets and returns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use crate::policy::dataplane::PolicyDataplane;
use crate::policy::proto::{
    self, FrameError, FromDataplane, ToDataplane, from_dataplane, read_message, to_dataplane,
    write_message,
};

use crate::policy::dataplane::{EndpointKey, Statuses, status_changes};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("reading from Felix: {0}")]
    Read(FrameError),
    #[error("writing to Felix: {0}")]
    Write(FrameError),
    #[error(transparent)]
    Firewall(#[from] crate::net::firewall::FirewallError),
}

struct Status {
    sequence: u64,
    started: Instant,
    sent: Statuses,
}

impl Status {
    async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
        payload: from_dataplane::Payload,
    ) -> Result<(), DriverError> {
        let msg = FromDataplane {
            sequence_number: self.sequence,
            payload: Some(payload),
        };
        self.sequence += 1;
        write_message(out, &msg).await.map_err(DriverError::Write)
    }

    async fn process<W: AsyncWrite + Unpin>(&mut self, out: &mut W) -> Result<(), DriverError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let payload = from_dataplane::Payload::ProcessStatusUpdate(proto::ProcessStatusUpdate {
            iso_timestamp: iso8601(now),
            uptime: self.started.elapsed().as_secs_f64(),
        });
        self.send(out, payload).await
    }
}

/// `2026-12-01T03:04:05Z` from seconds since the epoch (UTC, no leap seconds).
pub fn iso8601(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days → civil date.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs the driver until Felix closes `input`.
pub async fn run<R, W>(
    input: R,
    mut output: W,
    mut dataplane: PolicyDataplane,
    status_interval: Duration,
) -> Result<(), DriverError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut status = Status {
        sequence: 0,
        started: Instant::now(),
        sent: BTreeMap::new(),
    };
    // Reading is not cancel-safe (a frame read half-way would be lost), so it has a task of
    // its own; the loop drains what is queued and applies once per burst.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let reader = tokio::spawn(async move {
        let mut input = input;
        loop {
            let msg = read_message::<_, ToDataplane>(&mut input).await;
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                break;
            }
        }
    });
    let mut expected_sequence = 0u64;
    let mut tick = tokio::time::interval(status_interval);
    let outcome = loop {
        let first = tokio::select! {
            msg = rx.recv() => msg.unwrap_or(Err(FrameError::Closed)),
            _ = tick.tick() => {
                status.process(&mut output).await?;
                continue;
            }
        };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut ended = None;
        for msg in batch {
            match msg {
                Ok(msg) => {
                    if msg.sequence_number != expected_sequence {
                        warn!(
                            got = msg.sequence_number,
                            expected = expected_sequence,
                            "felix driver: sequence gap"
                        );
                    }
                    expected_sequence = msg.sequence_number + 1;
                    if let Some(payload) = msg.payload {
                        if let to_dataplane::Payload::ConfigUpdate(_) = &payload {
                            debug!("felix driver: configuration received");
                        }
                        dataplane.handle(payload);
                    }
                }
                Err(e) => {
                    ended = Some(e);
                    break;
                }
            }
        }
        if dataplane.in_sync() {
            match dataplane.apply().await {
                Ok(_) => report_endpoints(&dataplane, &mut status, &mut output).await?,
                Err(e) => {
                    warn!(error = %e, "felix driver: apply failed; retrying with the next message")
                }
            }
        }
        if let Some(e) = ended {
            break e;
        }
    };
    reader.abort();
    info!("felix driver stopping: removing its chains and sets");
    dataplane.remove().await?;
    match outcome {
        FrameError::Closed => Ok(()),
        e => Err(DriverError::Read(e)),
    }
}

/// Sends the endpoint statuses that changed: `up` when the endpoint is active and its
/// interface is up, else `down`.
async fn report_endpoints<W: AsyncWrite + Unpin>(
    dataplane: &PolicyDataplane,
    status: &mut Status,
    out: &mut W,
) -> Result<(), DriverError> {
    let now = dataplane.endpoint_statuses().await;
    let (gone, changed) = status_changes(&status.sent, &now);
    let id = |k: &EndpointKey| proto::WorkloadEndpointId {
        orchestrator_id: k.0.clone(),
        workload_id: k.1.clone(),
        endpoint_id: k.2.clone(),
    };
    for k in gone {
        status.sent.remove(&k);
        let payload = from_dataplane::Payload::WorkloadEndpointStatusRemove(
            proto::WorkloadEndpointStatusRemove { id: Some(id(&k)) },
        );
        status.send(out, payload).await?;
    }
    for (k, s) in changed {
        let payload = from_dataplane::Payload::WorkloadEndpointStatusUpdate(
            proto::WorkloadEndpointStatusUpdate {
                id: Some(id(&k)),
                status: Some(proto::EndpointStatus {
                    status: s.to_string(),
                }),
            },
        );
        status.send(out, payload).await?;
        status.sent.insert(k, s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(Duration::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso8601(Duration::from_secs(1_511_870_400)),
            "2017-11-28T12:00:00Z"
        );
        assert_eq!(
            iso8601(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
