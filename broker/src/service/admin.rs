//! AdminService: topics.

use std::sync::Arc;

use spool_proto::v1::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::check_user_topic;
use crate::auth::{Action, principal};
use crate::convert::{apply_topic_config, topic_config_to_wire};
use crate::error::BrokerError;
use crate::metrics::timed;
use crate::{State, blocking};

#[derive(Debug)]
pub(crate) struct Admin {
    state: Arc<State>,
}

impl Admin {
    pub(crate) fn new(state: Arc<State>) -> Admin {
        Admin { state }
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_topic(
        &self,
        req: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        timed(&self.state.metrics, "CreateTopic", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Admin, &req.topic)?;
            check_user_topic(&req.topic)?;
            let mut cfg = self.state.topic_defaults.clone();
            if req.partitions > 0 {
                cfg.partitions = req.partitions;
            }
            if let Some(wire) = &req.config {
                apply_topic_config(&mut cfg, wire)?;
            }
            let log = self.state.log.clone();
            let created = cfg.clone();
            blocking(move || log.create_topic(&req.topic, cfg))
                .await?
                .map_err(BrokerError::from)?;
            Ok(Response::new(v1::CreateTopicResponse {
                config: Some(topic_config_to_wire(&created)),
            }))
        })
        .await
    }

    async fn delete_topic(
        &self,
        req: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        timed(&self.state.metrics, "DeleteTopic", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Admin, &req.topic)?;
            check_user_topic(&req.topic)?;
            let log = self.state.log.clone();
            blocking(move || log.delete_topic(&req.topic))
                .await?
                .map_err(BrokerError::from)?;
            Ok(Response::new(v1::DeleteTopicResponse {}))
        })
        .await
    }

    async fn list_topics(
        &self,
        req: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        timed(&self.state.metrics, "ListTopics", async move {
            // A token sees the topics it may describe (produce to, consume from or administer).
            let who = principal(&req);
            let log = &self.state.log;
            let topics = log
                .topics()
                .into_iter()
                .filter(|t| who.allows(Action::Describe, t))
                .filter_map(|t| {
                    let n = log.topic_config(&t).ok()?.partitions;
                    Some(v1::TopicSummary {
                        topic: t,
                        partitions: n,
                    })
                })
                .collect();
            Ok(Response::new(v1::ListTopicsResponse { topics }))
        })
        .await
    }

    async fn describe_topic(
        &self,
        req: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        timed(&self.state.metrics, "DescribeTopic", async move {
            let who = principal(&req);
            let topic = req.into_inner().topic;
            who.require(Action::Describe, &topic)?;
            let log = &self.state.log;
            let cfg = log.topic_config(&topic).map_err(BrokerError::from)?;
            let partitions = log
                .partitions(&topic)
                .map_err(BrokerError::from)?
                .iter()
                .map(|p| {
                    let s = p.stats();
                    v1::PartitionInfo {
                        partition: p.id(),
                        log_start_offset: s.log_start_offset,
                        high_watermark: s.high_watermark,
                        size_bytes: s.size_bytes,
                        segments: s.segments as u32,
                    }
                })
                .collect();
            Ok(Response::new(v1::DescribeTopicResponse {
                topic,
                config: Some(topic_config_to_wire(&cfg)),
                partitions,
            }))
        })
        .await
    }

    async fn alter_topic_config(
        &self,
        req: Request<v1::AlterTopicConfigRequest>,
    ) -> Result<Response<v1::AlterTopicConfigResponse>, Status> {
        timed(&self.state.metrics, "AlterTopicConfig", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Admin, &req.topic)?;
            check_user_topic(&req.topic)?;
            let mut cfg = self
                .state
                .log
                .topic_config(&req.topic)
                .map_err(BrokerError::from)?;
            if let Some(wire) = &req.config {
                apply_topic_config(&mut cfg, wire)?;
            }
            let log = self.state.log.clone();
            let applied = cfg.clone();
            blocking(move || log.alter_topic(&req.topic, cfg))
                .await?
                .map_err(BrokerError::from)?;
            Ok(Response::new(v1::AlterTopicConfigResponse {
                config: Some(topic_config_to_wire(&applied)),
            }))
        })
        .await
    }

    async fn add_partitions(
        &self,
        req: Request<v1::AddPartitionsRequest>,
    ) -> Result<Response<v1::AddPartitionsResponse>, Status> {
        timed(&self.state.metrics, "AddPartitions", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Admin, &req.topic)?;
            check_user_topic(&req.topic)?;
            let log = self.state.log.clone();
            let n = req.partitions;
            blocking(move || log.add_partitions(&req.topic, n))
                .await?
                .map_err(BrokerError::from)?;
            Ok(Response::new(v1::AddPartitionsResponse { partitions: n }))
        })
        .await
    }
}
