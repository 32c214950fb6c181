//! CSI Identity service: who the plugin is and whether its source is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::VolumeSource;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, Service, service};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

pub struct IdentityService<S> {
    driver_name: String,
    version: String,
    source: Arc<S>,
}

impl<S: VolumeSource> IdentityService<S> {
    /// `driver_name` must equal the `CSIDriver` object's name; `version` is opaque to
    /// kubelet (the root passes its own package version).
    pub fn new(driver_name: impl Into<String>, version: impl Into<String>, source: Arc<S>) -> Self {
        Self {
            driver_name: driver_name.into(),
            version: version.into(),
            source,
        }
    }
}

#[tonic::async_trait]
impl<S: VolumeSource> Identity for IdentityService<S> {
    #[tracing::instrument(skip_all)]
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: self.version.clone(),
            manifest: Default::default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // Node-only plugin: no CONTROLLER_SERVICE. NodeGetInfo reports a topology segment
        // per node, which this capability declares.
        let accessibility = PluginCapability {
            r#type: Some(plugin_capability::Type::Service(Service {
                r#type: service::Type::VolumeAccessibilityConstraints as i32,
            })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![accessibility],
        }))
    }

    /// Ready when the source is; an unready source is reported as `ready: false` rather than
    /// an error so that liveness probes tell "starting" from "broken plugin".
    #[tracing::instrument(skip_all)]
    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match self.source.ready().await {
            Ok(()) => true,
            Err(error) => {
                tracing::info!(%error, "volume source not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
