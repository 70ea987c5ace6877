//! LISTEN / NOTIFY: wakes this process's event streams when any replica's sequencer has
//! numbered events.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::StreamExt;

use super::{DatabaseUrl, Db, event_log};

/// Keeps a LISTEN connection to PostgreSQL and signals [`Db::appended`] whenever a sequencer of
/// any replica numbers events, reconnecting after failures. A lost notification only delays a
/// stream: the streams also re-read the log when idle. Returns at once on SQLite (one process).
pub(crate) async fn listen_for_events(db: Db) {
    let DatabaseUrl::Postgres(url) = db.url() else {
        return;
    };
    loop {
        match AsyncPgConnection::establish(url).await {
            Ok(mut conn) => match conn
                .batch_execute(&format!("LISTEN {}", event_log::CHANNEL))
                .await
            {
                Ok(()) => {
                    // Whatever was numbered while not listening is read now.
                    db.signal_appended();
                    let mut notifications = std::pin::pin!(conn.notifications_stream());
                    while let Some(Ok(_)) = notifications.next().await {
                        db.signal_appended();
                    }
                    tracing::warn!("event notification connection lost; reconnecting");
                }
                Err(err) => tracing::warn!(error = %err, "LISTEN failed; retrying"),
            },
            Err(err) => tracing::warn!(error = %err, "cannot open the LISTEN connection; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
