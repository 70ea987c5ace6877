//! `hopper.delegation.v1.InstanceService`.

use tonic::{Request, Response, Status};

use super::{FromProto, all, id, lease, page, text, timestamp};
use crate::{
    auth::Caller,
    domain::{InstanceStatus, Scope, limits},
    proto::{self as pb, json, server::instance_service_server::InstanceService},
    repository::instances::{self, NewInstance},
    store::{Db, instances::Filter},
};

/// Serves InstanceService from a database.
#[derive(Clone)]
pub struct InstanceApi {
    db: Db,
}

impl InstanceApi {
    /// A service over `db`.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

#[tonic::async_trait]
impl InstanceService for InstanceApi {
    async fn register_instance(
        &self,
        request: Request<pb::RegisterInstanceRequest>,
    ) -> Result<Response<pb::RegisterInstanceResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let config = match r.config {
            Some(config) => json::from_struct("config", config)?,
            None => serde_json::Value::Object(Default::default()),
        };
        limits::json("config", &config)?;
        let new = NewInstance {
            request_id: limits::optional_id("request_id", &r.request_id)?
                .map(|id| caller.request_key(id)),
            id: limits::optional_id("id", &r.id)?,
            name: text("name", r.name, limits::MAX_NAME_LEN, true)?,
            scope: Scope::required("scope", r.scope)?,
            parent_id: limits::optional_id("parent_id", &r.parent_id)?,
            status: InstanceStatus::from_proto("status", r.status)?
                .unwrap_or(InstanceStatus::Created),
            config,
            lease: lease(r.lease)?,
        };
        let registered = instances::register(&self.db, &caller, new).await?;
        Ok(Response::new(pb::RegisterInstanceResponse {
            instance: Some(registered.into()),
        }))
    }

    async fn get_instance(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::GetInstanceResponse>, Status> {
        let caller = Caller::of(&request)?;
        let instance_id = id("id", request.into_inner().id)?;
        let instance = instances::get(&self.db, &caller, &instance_id).await?;
        Ok(Response::new(pb::GetInstanceResponse {
            instance: Some(instance.into()),
        }))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let filter = Filter {
            scope: Scope::from_proto("scope", r.scope)?,
            parent_id: limits::optional_id("parent_id", &r.parent_id)?,
            status: InstanceStatus::from_proto("status", r.status)?,
            within: None,
        };
        let page = page(r.page_size, r.page_token)?;
        let page = instances::list(&self.db, &caller, &filter, &page).await?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: all(page.items),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_instance_status(
        &self,
        request: Request<pb::UpdateInstanceStatusRequest>,
    ) -> Result<Response<pb::UpdateInstanceStatusResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let instance_id = id("id", r.id)?;
        let status = InstanceStatus::required("status", r.status)?;
        let updated = instances::set_status(&self.db, &caller, &instance_id, status).await?;
        Ok(Response::new(pb::UpdateInstanceStatusResponse {
            instance: Some(updated.into()),
        }))
    }

    async fn get_instance_tree(
        &self,
        request: Request<pb::GetInstanceTreeRequest>,
    ) -> Result<Response<pb::GetInstanceTreeResponse>, Status> {
        let caller = Caller::of(&request)?;
        let root = limits::optional_id("root_id", &request.into_inner().root_id)?;
        let nodes = instances::tree(&self.db, &caller, root.as_deref()).await?;
        Ok(Response::new(pb::GetInstanceTreeResponse {
            nodes: nodes
                .into_iter()
                .map(|node| pb::InstanceTreeNode {
                    instance: Some(node.instance.into()),
                    pending_delegations: node.pending,
                    accepted_delegations: node.accepted,
                })
                .collect(),
        }))
    }

    async fn renew_instance_lease(
        &self,
        request: Request<pb::RenewInstanceLeaseRequest>,
    ) -> Result<Response<pb::RenewInstanceLeaseResponse>, Status> {
        let caller = Caller::of(&request)?;
        let instance_id = id("instance_id", request.into_inner().instance_id)?;
        let renewed = instances::renew_lease(&self.db, &caller, &instance_id).await?;
        Ok(Response::new(pb::RenewInstanceLeaseResponse {
            live_until: renewed.lease_expires_at.map(timestamp),
            instance: Some(renewed.into()),
        }))
    }
}
