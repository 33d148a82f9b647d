//! OffsetService: committed offsets of consumer groups.

use std::sync::Arc;

use spool_proto::v1::{self, offset_service_server::OffsetService};
use tonic::{Request, Response, Status};

use super::now_ms;
use crate::auth::{Action, principal};
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
            let state = self.state.clone();
            blocking(move || state.offsets.commit(&req.group, &req.offsets, now_ms())).await??;
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
            let offsets = self.state.offsets.fetch(&req.group, &req.partitions)?;
            Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
        })
        .await
    }
}
