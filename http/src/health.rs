//! `/health/ready`: PostgreSQL and Kafka answer. (`/health/live` needs no handler.)

use crate::error::ApiError;
use crate::request::{json, Result};
use crate::ApiState;
use std::sync::Arc;
use warp::http::StatusCode;
use warp::reply::Response;

pub async fn ready(state: Arc<ApiState>) -> Result<Response> {
    sinks::query::ping(&state.pool)
        .await
        .map_err(|e| ApiError::unavailable(format!("PostgreSQL: {e}")))?;
    let producer = state.producer.clone();
    let topic = state.cfg.commands_topic.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer
            .client()
            .fetch_metadata(Some(&topic), std::time::Duration::from_secs(2))
            .map(|_| ())
    })
    .await;
    match kafka {
        Ok(Ok(())) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ready" }),
        )),
        Ok(Err(e)) => Err(ApiError::unavailable(format!("Kafka: {e}"))),
        Err(e) => Err(ApiError::unavailable(format!("Kafka check failed: {e}"))),
    }
}
