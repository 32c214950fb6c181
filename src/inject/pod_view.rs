//! The part of a pod spec injection looks at. Reading only these fields
//! (serde skips the rest: images, env, resources, probes...) keeps the
//! webhook's cost per review close to the cost of decoding the review.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use super::CSI_DRIVER;

/// Volumes, containers, affinity and service account of a pod spec.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub volumes: Option<Vec<VolumeView>>,
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub affinity: Option<AffinityView>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// The deprecated alias some old manifests still set.
    #[serde(default)]
    pub service_account: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct VolumeView {
    pub name: String,
    #[serde(default)]
    pub csi: Option<CsiView>,
}

#[derive(Debug, Deserialize)]
pub struct CsiView {
    pub driver: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub volume_mounts: Option<Vec<MountView>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView {
    pub name: String,
    pub mount_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AffinityView {
    #[serde(default)]
    pub node_affinity: Option<NodeAffinityView>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAffinityView {
    #[serde(default)]
    pub required_during_scheduling_ignored_during_execution: Option<NodeSelectorView>,
    #[serde(default)]
    pub preferred_during_scheduling_ignored_during_execution: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorView {
    #[serde(default)]
    pub node_selector_terms: Vec<NodeSelectorTermView>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorTermView {
    #[serde(default)]
    pub match_expressions: Option<IgnoredAny>,
}

impl PodView {
    /// Read the view from a pod's `spec` as JSON.
    pub fn from_spec(spec: &Value) -> Result<Self, serde_json::Error> {
        PodView::deserialize(spec)
    }

    /// The service account the pod runs as.
    pub fn service_account(&self) -> &str {
        self.service_account_name
            .as_deref()
            .or(self.service_account.as_deref())
            .unwrap_or("default")
    }

    /// Whether the pod already carries the volume this webhook adds. The
    /// volume, not the status annotation, is the proof: annotations get
    /// copied between manifests, and a copied `status: injected` must not
    /// stop an injection.
    pub fn is_injected(&self) -> bool {
        self.volumes.iter().flatten().any(|volume| {
            volume.name == super::VOLUME_NAME
                && volume
                    .csi
                    .as_ref()
                    .is_some_and(|csi| csi.driver == CSI_DRIVER)
        })
    }
}
