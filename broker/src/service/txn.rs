//! TransactionService: offsets in a transaction, ending transactions (CommitTxn: both at
//! once), listing them. The
//! coordinator (`crate::txn`) does the work; transactional producers get their id and epoch
//! from `ProduceService.InitProducerId`.
//!
//! ACLs: AddOffsetsToTxn needs `groups` on the group and `consume` on each topic (as
//! CommitOffsets), CommitTxn the same for each of its groups; every call needs the right to
//! produce somewhere.

use std::sync::Arc;

use spool_proto::v1::{self, transaction_service_server::TransactionService};
use tonic::{Request, Response, Status};

use super::check_count;
use crate::State;
use crate::auth::{Action, principal};
use crate::error::BrokerError;
use crate::metrics::timed;

#[derive(Debug)]
pub(crate) struct Transactions {
    state: Arc<State>,
}

impl Transactions {
    pub(crate) fn new(state: Arc<State>) -> Transactions {
        Transactions { state }
    }
}

fn require_producer<T>(req: &Request<T>) -> Result<(), BrokerError> {
    if principal(req).may_produce_somewhere() {
        Ok(())
    } else {
        Err(BrokerError::NotAuthorized(
            "transactions need the right to produce to some topic".into(),
        ))
    }
}

#[tonic::async_trait]
impl TransactionService for Transactions {
    async fn add_offsets_to_txn(
        &self,
        req: Request<v1::AddOffsetsToTxnRequest>,
    ) -> Result<Response<v1::AddOffsetsToTxnResponse>, Status> {
        timed(&self.state.metrics, "AddOffsetsToTxn", async move {
            require_producer(&req)?;
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            check_count(&self.state, req.offsets.len(), "offsets")?;
            for c in &req.offsets {
                who.require(Action::Consume, &c.topic)?;
            }
            self.state.txns.add_offsets(req).await?;
            Ok(Response::new(v1::AddOffsetsToTxnResponse {}))
        })
        .await
    }

    async fn end_txn(
        &self,
        req: Request<v1::EndTxnRequest>,
    ) -> Result<Response<v1::EndTxnResponse>, Status> {
        timed(&self.state.metrics, "EndTxn", async move {
            require_producer(&req)?;
            let req = req.into_inner();
            let (producer_id, epoch) = self
                .state
                .txns
                .end(
                    &req.transactional_id,
                    req.producer_id,
                    req.producer_epoch,
                    req.commit,
                )
                .await?;
            Ok(Response::new(v1::EndTxnResponse {
                producer_id,
                producer_epoch: i32::from(epoch),
            }))
        })
        .await
    }

    async fn commit_txn(
        &self,
        req: Request<v1::CommitTxnRequest>,
    ) -> Result<Response<v1::CommitTxnResponse>, Status> {
        timed(&self.state.metrics, "CommitTxn", async move {
            require_producer(&req)?;
            let who = principal(&req);
            let req = req.into_inner();
            // Groups, and their offsets together, as many as one request's partitions.
            check_count(&self.state, req.groups.len(), "groups")?;
            let offsets = req.groups.iter().map(|g| g.offsets.len()).sum();
            check_count(&self.state, offsets, "offsets")?;
            for g in &req.groups {
                who.require(Action::Group, &g.group)?;
                for c in &g.offsets {
                    who.require(Action::Consume, &c.topic)?;
                }
            }
            let (producer_id, epoch) = self.state.txns.commit_with_offsets(req).await?;
            Ok(Response::new(v1::CommitTxnResponse {
                producer_id,
                producer_epoch: i32::from(epoch),
            }))
        })
        .await
    }

    async fn list_transactions(
        &self,
        req: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        timed(&self.state.metrics, "ListTransactions", async move {
            require_producer(&req)?;
            let transactions = self.state.txns.list().await;
            Ok(Response::new(v1::ListTransactionsResponse { transactions }))
        })
        .await
    }
}
