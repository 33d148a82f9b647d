//! OffsetService: committed offsets of consumer groups.
//!
//! ACLs: a group's offsets need `groups` on the group; committing also needs `consume` on each
//! topic, and so does deleting only some topics' offsets (deleting a whole group needs the
//! group alone, as Kafka's DeleteGroups). `ListGroups` shows only the groups the token may use.

use std::sync::Arc;

use spool_proto::v1::{self, offset_service_server::OffsetService};
use tonic::{Request, Response, Status};

use crate::auth::{Action, principal};
use crate::error::BrokerError;
use crate::metrics::timed;
use crate::{State, blocking};

#[derive(Debug)]
pub(crate) struct Offsets {
    state: Arc<State>,
}

impl Offsets {
    pub(crate) fn new(state: Arc<State>) -> Offsets {
        Offsets { state }
    }
}

#[tonic::async_trait]
impl OffsetService for Offsets {
    async fn commit_offsets(
        &self,
        req: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        timed(&self.state.metrics, "CommitOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            for c in &req.offsets {
                who.require(Action::Consume, &c.topic)?;
            }
            if !req.member_id.is_empty() {
                // Fenced: checked and appended by the group's coordinator.
                crate::offsets::validate_group(&req.group)?;
                let groups = self.state.groups.clone();
                groups
                    .commit(
                        &req.group,
                        req.member_id,
                        req.generation,
                        req.offsets,
                        self.state.now_ms(),
                    )
                    .await?;
                return Ok(Response::new(v1::CommitOffsetsResponse {}));
            }
            let state = self.state.clone();
            blocking(move || {
                state
                    .offsets
                    .commit_with(&req.group, &req.offsets, state.now_ms(), || {
                        state.groups.require_empty(&req.group, "a plain commit")
                    })
            })
            .await??;
            Ok(Response::new(v1::CommitOffsetsResponse {}))
        })
        .await
    }

    async fn fetch_offsets(
        &self,
        req: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        timed(&self.state.metrics, "FetchOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            // On the runtime's thread unless a commit of this group is in flight (its fsync
            // running): then the fetch waits for it to land, on a blocking thread.
            let offsets = match self
                .state
                .offsets
                .fetch_if_settled(&req.group, &req.partitions)?
            {
                Some(offsets) => offsets,
                None => {
                    let state = self.state.clone();
                    blocking(move || state.offsets.fetch(&req.group, &req.partitions)).await??
                }
            };
            Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
        })
        .await
    }

    async fn list_groups(
        &self,
        req: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        timed(&self.state.metrics, "ListGroups", async move {
            let who = principal(&req);
            let groups = self
                .state
                .offsets
                .list_groups(|g| who.allows(Action::Group, g));
            Ok(Response::new(v1::ListGroupsResponse { groups }))
        })
        .await
    }

    async fn delete_group(
        &self,
        req: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        timed(&self.state.metrics, "DeleteGroup", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            let max = self.state.config.limits.max_partitions_per_request;
            if req.topics.len() > max {
                return Err(BrokerError::InvalidRequest(format!(
                    "{} topics in one request; at most {max}",
                    req.topics.len()
                ))
                .into());
            }
            for t in &req.topics {
                who.require(Action::Consume, t)?;
            }
            let state = self.state.clone();
            let partitions_deleted = blocking(move || {
                state
                    .offsets
                    .delete_group_with(&req.group, &req.topics, state.now_ms(), || {
                        state.groups.require_empty(&req.group, "deleting offsets")
                    })
            })
            .await??;
            Ok(Response::new(v1::DeleteGroupResponse {
                partitions_deleted,
            }))
        })
        .await
    }
}
