// Package csidriver is Granary's CSI node plugin: it serves the CSI
// Identity and Node services for ephemeral inline volumes, so that a
// Kubernetes pod can name a package (volume attribute "package") and see
// it read-only at a path for as long as the pod lives.
//
// Ownership: a Driver belongs to one node.Node and lives inside it. The
// node owns the package references (each published volume is a node.Hold,
// taken through the node's host references exactly as a job's IncRef is);
// the Driver owns its gRPC server and socket, its bind mounts, and its
// record of published volumes in <state>/csi/volumes.json, which it reads
// back at start (Recover) to take its volumes' references again before it
// serves.
//
// The protocol, in short: NodePublishVolume records the volume, takes the
// reference (waiting for a build in progress within the call's deadline),
// then bind-mounts <root>/pkgs/<id>/contents read-only at the target path
// and checks that a write there fails; NodeUnpublishVolume unmounts,
// releases the reference and forgets the volume. Both are idempotent. A
// package that is not available fails with codes.NotFound, which kubelet
// shows in the pod's events and retries with back-off.
package csidriver
