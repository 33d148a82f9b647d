//! GroupService: consumer-group membership (Membership stream, LeaveGroup, DescribeGroup).
//!
//! ACLs: joining needs `groups` on the group and `consume` on every topic; LeaveGroup and
//! DescribeGroup need `groups` on the group. The protocol runs in `crate::groups`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use spool_proto::v1::{self, group_service_server::GroupService};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::State;
use crate::auth::{Action, principal};
use crate::error::BrokerError;
use crate::groups::{JoinArgs, MemberEvent, STREAM_CAPACITY, strategy_from_wire};
use crate::metrics::timed;
use crate::offsets::validate_group;

/// Longest instance or member id.
const MAX_ID: usize = 249;

#[derive(Debug)]
pub(crate) struct Groups {
    state: Arc<State>,
}

impl Groups {
    pub(crate) fn new(state: Arc<State>) -> Groups {
        Groups { state }
    }
}

fn validate_id(what: &str, id: &str) -> Result<(), BrokerError> {
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(char::is_control) {
        return Err(BrokerError::InvalidRequest(format!(
            "{what} must be 1 to {MAX_ID} printable characters"
        )));
    }
    Ok(())
}

impl Groups {
    fn join_args(&self, j: v1::JoinGroup) -> Result<JoinArgs, BrokerError> {
        validate_group(&j.group)?;
        let cfg = &self.state.config.groups;
        let max = self.state.config.limits.max_partitions_per_request;
        if j.topics.is_empty() || j.topics.len() > max {
            return Err(BrokerError::InvalidRequest(format!(
                "a member subscribes to 1 to {max} topics"
            )));
        }
        if let Some(i) = &j.instance_id {
            validate_id("instance_id", i)?;
        }
        if !j.member_id.is_empty() {
            validate_id("member_id", &j.member_id)?;
        }
        let strategy = v1::AssignmentStrategy::try_from(j.strategy).map_err(|_| {
            BrokerError::InvalidRequest(format!("unknown assignment strategy {}", j.strategy))
        })?;
        let session_ms = match u64::from(j.session_timeout_ms) {
            0 => cfg.session_timeout_ms,
            s => s.clamp(cfg.min_session_timeout_ms, cfg.max_session_timeout_ms),
        }
        // Heartbeats (a third of it) must keep the connection from the idle timeout.
        .min(self.state.config.limits.idle_timeout_ms);
        let rebalance_ms = match u64::from(j.rebalance_timeout_ms) {
            0 => cfg.rebalance_timeout_ms,
            r => r.clamp(100, cfg.max_rebalance_timeout_ms),
        };
        Ok(JoinArgs {
            group: j.group,
            topics: j.topics.into_iter().collect::<BTreeSet<_>>(),
            instance: j.instance_id,
            previous_id: (!j.member_id.is_empty()).then_some(j.member_id),
            strategy: strategy_from_wire(strategy),
            session_ms,
            rebalance_ms,
        })
    }
}

#[tonic::async_trait]
impl GroupService for Groups {
    type MembershipStream = ReceiverStream<Result<v1::MembershipResponse, Status>>;

    async fn membership(
        &self,
        req: Request<Streaming<v1::MembershipRequest>>,
    ) -> Result<Response<Self::MembershipStream>, Status> {
        timed(&self.state.metrics, "Membership", async move {
            let who = principal(&req);
            let mut inbound = req.into_inner();
            let wait = Duration::from_millis(self.state.config.limits.request_timeout_ms);
            let first = match tokio::time::timeout(wait, inbound.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => {
                    return Err(BrokerError::InvalidRequest("no JoinGroup".into()).into());
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(BrokerError::InvalidRequest(
                        "no JoinGroup within the request timeout".into(),
                    )
                    .into());
                }
            };
            let Some(v1::membership_request::Request::Join(join)) = first.request else {
                return Err(BrokerError::InvalidRequest(
                    "the first message of a Membership stream must be a JoinGroup".into(),
                )
                .into());
            };
            let args = self.join_args(join)?;
            who.require(Action::Group, &args.group)?;
            for t in &args.topics {
                who.require(Action::Consume, t)?;
            }
            let group = args.group.clone();
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            let groups = self.state.groups.clone();
            let member = groups.join(args, tx).await?;
            let mut shutdown = self.state.shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        m = inbound.message() => m,
                        _ = shutdown.changed() => return,
                    };
                    let event = match msg {
                        Ok(Some(v1::MembershipRequest { request: Some(r) })) => match r {
                            v1::membership_request::Request::Heartbeat(_) => MemberEvent::Heartbeat,
                            v1::membership_request::Request::Ack(a) => {
                                MemberEvent::Ack(a.generation)
                            }
                            v1::membership_request::Request::Leave(_) => MemberEvent::Leave,
                            // A second join on the same stream means nothing: count it as
                            // a sign of life.
                            v1::membership_request::Request::Join(_) => MemberEvent::Heartbeat,
                        },
                        Ok(Some(_)) => MemberEvent::Heartbeat,
                        // A message the codec refused ends the stream with its status (not
                        // with OK, as if the client had closed it); the member leaves either way.
                        end @ (Ok(None) | Err(_)) => {
                            let why = end.err().map(super::receive_error);
                            groups
                                .member_event(&group, &member, MemberEvent::Closed(why))
                                .await;
                            return;
                        }
                    };
                    groups.member_event(&group, &member, event).await;
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn leave_group(
        &self,
        req: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        timed(&self.state.metrics, "LeaveGroup", async move {
            let who = principal(&req);
            let req = req.into_inner();
            validate_group(&req.group)?;
            who.require(Action::Group, &req.group)?;
            let (member, instance) = match (req.member_id.is_empty(), req.instance_id.is_empty()) {
                (false, true) => (Some(req.member_id), None),
                (true, false) => (None, Some(req.instance_id)),
                _ => {
                    return Err(BrokerError::InvalidRequest(
                        "name exactly one of member_id and instance_id".into(),
                    )
                    .into());
                }
            };
            if self.state.groups.member_count(&req.group) == 0 {
                return Err(BrokerError::FencedMember {
                    group: req.group,
                    member: member.or(instance).unwrap_or_default(),
                    reason: "the group has no members".into(),
                }
                .into());
            }
            self.state
                .groups
                .leave(&req.group, member, instance)
                .await?;
            Ok(Response::new(v1::LeaveGroupResponse {}))
        })
        .await
    }

    async fn describe_group(
        &self,
        req: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        timed(&self.state.metrics, "DescribeGroup", async move {
            let who = principal(&req);
            let req = req.into_inner();
            validate_group(&req.group)?;
            who.require(Action::Group, &req.group)?;
            Ok(Response::new(self.state.groups.describe(&req.group).await?))
        })
        .await
    }
}
