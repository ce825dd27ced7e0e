//! The CSI v1 messages and services generated from `proto/csi.proto` (build.rs): the
//! servers `grpc` implements and the clients the tests drive as a kubelet stand-in.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Package `csi.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/csi.v1.rs"));

    use std::fmt;

    /// Written by hand: `secrets` and `volume_context` hold the pod's service-account token
    /// (CVE-2023-2878), so only their keys are shown, and no value of `publish_context`.
    impl fmt::Debug for NodePublishVolumeRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("NodePublishVolumeRequest")
                .field("volume_id", &self.volume_id)
                .field("publish_context_keys", &self.publish_context.keys())
                .field("staging_target_path", &self.staging_target_path)
                .field("target_path", &self.target_path)
                .field("volume_capability", &self.volume_capability)
                .field("readonly", &self.readonly)
                .field("secrets_keys", &self.secrets.keys())
                .field("volume_context_keys", &self.volume_context.keys())
                .finish()
        }
    }
}
