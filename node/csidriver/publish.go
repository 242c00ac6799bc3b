package csidriver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/granary-build/granary/core"
)

// nodeServer is the CSI Node service: publish and unpublish only (no
// staging, no stats, no expansion: a package is read-only and its size is
// fixed).
type nodeServer struct {
	csi.UnimplementedNodeServer
	d *Driver
}

// NodeGetCapabilities lists none: ephemeral volumes are published
// without a stage step.
func (s nodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// NodeGetInfo names the node by its Granary host name.
func (s nodeServer) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: s.d.n.Config().Name}, nil
}

// NodePublishVolume shows a package at the target path for a pod: see
// Driver.publish.
func (s nodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	v, err := volumeOf(req)
	if err != nil {
		return nil, err
	}
	if err := s.d.publish(ctx, v); err != nil {
		return nil, err
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume undoes a publish: see Driver.unpublish.
func (s nodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID missing")
	}
	if req.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "target path missing")
	}
	if err := s.d.unpublish(req.GetVolumeId(), filepath.Clean(req.GetTargetPath())); err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// volumeOf checks a publish request and returns the volume it asks for.
func volumeOf(req *csi.NodePublishVolumeRequest) (*volume, error) {
	switch {
	case req.GetVolumeId() == "":
		return nil, status.Error(codes.InvalidArgument, "volume ID missing")
	case req.GetTargetPath() == "":
		return nil, status.Error(codes.InvalidArgument, "target path missing")
	case req.GetVolumeCapability() == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability missing")
	case req.GetVolumeCapability().GetBlock() != nil:
		return nil, status.Error(codes.InvalidArgument, "a package is a directory tree: block access is not supported")
	}
	attrs := req.GetVolumeContext()
	id := attrs[AttrPackage]
	if id == "" {
		return nil, status.Errorf(codes.InvalidArgument, "volume attribute %q is required: the ID of the package to show", AttrPackage)
	}
	if err := core.ValidateID(id); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "volume attribute %q: %v", AttrPackage, err)
	}
	sub, err := cleanSubPath(attrs[AttrSubPath])
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "volume attribute %q: %v", AttrSubPath, err)
	}
	return &volume{
		ID: req.GetVolumeId(), Package: id, SubPath: sub, Target: filepath.Clean(req.GetTargetPath()),
		Pod: pod{Namespace: attrs[attrPodNamespace], Name: attrs[attrPodName], UID: attrs[attrPodUID], ServiceAccount: attrs[attrServiceAccount]},
	}, nil
}

// cleanSubPath returns p cleaned, "" for the whole package; it refuses an
// absolute path or one that climbs out.
func cleanSubPath(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	if filepath.IsAbs(p) {
		return "", fmt.Errorf("%q: want a path relative to the package's contents", p)
	}
	c := filepath.Clean(p)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("%q leaves the package's contents", p)
	}
	if c == "." {
		return "", nil
	}
	return c, nil
}

// claim makes the caller the only call working on volume id, or returns
// codes.Aborted if another call is (kubelet retries).
func (d *Driver) claim(id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.busy[id] {
		return status.Errorf(codes.Aborted, "an operation on volume %s is in progress", id)
	}
	d.busy[id] = true
	return nil
}

func (d *Driver) unclaim(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.busy, id)
}

// publish shows v's package at v.Target for v's pod, in this order:
//
//  1. a volume already published with the same package and target is
//     done (idempotent); one published differently is AlreadyExists;
//  2. take the reference through the node (node.Node.HoldFor), as the
//     pod: it waits for a build in progress until ctx's deadline, and a
//     package that is not available is codes.NotFound;
//  3. record the volume (so a restart finds it before the mount exists);
//  4. bind-mount the contents read-only at the target and check that a
//     write there fails.
//
// Any failure undoes what was done (unmount, record, reference).
func (d *Driver) publish(ctx context.Context, v *volume) error {
	if err := d.claim(v.ID); err != nil {
		return err
	}
	defer d.unclaim(v.ID)
	d.mu.Lock()
	old := d.vols[v.ID]
	d.mu.Unlock()
	if old != nil {
		if old.Package != v.Package || old.Target != v.Target || old.SubPath != v.SubPath {
			return status.Errorf(codes.AlreadyExists, "volume %s is published with package %s at %s", v.ID, old.Package, old.Target)
		}
		if mounted, err := isMountPoint(v.Target); err == nil && mounted {
			return nil
		}
		// Its mount is gone (unmounted behind our back): mount it again.
		return d.mount(v)
	}
	v.Since = time.Now()
	h, err := d.n.HoldForPod(ctx, v.Package, v.podName(), v.holder())
	if err != nil {
		return holdStatus(v.Package, err)
	}
	src, err := d.source(v)
	if err != nil {
		h.Release() //nolint:errcheck // held, so it cannot fail
		return status.Errorf(codes.InvalidArgument, "volume attribute %q: %v", AttrSubPath, err)
	}
	d.mu.Lock()
	d.vols[v.ID] = v
	d.holds[v.ID] = h
	err = d.rec.save(d.vols)
	d.mu.Unlock()
	if err == nil {
		err = d.mountAt(src, v.Target)
	}
	if err != nil {
		d.forget(v.ID)
		return status.Errorf(codes.Internal, "publish volume %s (package %s): %v", v.ID, v.Package, err)
	}
	d.log.Info("volume published", "volume", v.ID, "package", v.Package, "target", v.Target, "holder", v.holder())
	return nil
}

// source is the directory a volume shows: the package's contents, or the
// sub-path in them, which must be a directory and, symbolic links
// resolved, stay inside them. The package must be held (it exists).
func (d *Driver) source(v *volume) (string, error) {
	src := d.n.Store().Handle(v.Package).OutputDirectory()
	if v.SubPath == "" {
		return src, nil
	}
	base, err := filepath.EvalSymlinks(src)
	if err != nil {
		return "", err
	}
	full, err := filepath.EvalSymlinks(filepath.Join(src, v.SubPath))
	if err != nil {
		return "", fmt.Errorf("%s is not in package %s: %w", v.SubPath, v.Package, err)
	}
	if full != base && !strings.HasPrefix(full, base+string(filepath.Separator)) {
		return "", fmt.Errorf("%s leaves package %s's contents (through a symbolic link)", v.SubPath, v.Package)
	}
	if st, err := os.Stat(full); err != nil || !st.IsDir() {
		return "", fmt.Errorf("%s in package %s is not a directory", v.SubPath, v.Package)
	}
	return full, nil
}

// mount mounts an already held volume again.
func (d *Driver) mount(v *volume) error {
	src, err := d.source(v)
	if err == nil {
		err = d.mountAt(src, v.Target)
	}
	if err != nil {
		return status.Errorf(codes.Internal, "publish volume %s (package %s): %v", v.ID, v.Package, err)
	}
	return nil
}

// mountAt makes the target directory and bind-mounts src there
// read-only.
func (d *Driver) mountAt(src, target string) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fmt.Errorf("target path: %w", err)
	}
	return bindReadOnly(src, target)
}

// forget undoes a publish: unmounts, releases the reference, and removes
// the record. The caller has claimed the volume.
func (d *Driver) forget(id string) error {
	d.mu.Lock()
	v, h := d.vols[id], d.holds[id]
	d.mu.Unlock()
	var errs []error
	if v != nil {
		if err := unmountAll(v.Target); err != nil {
			return err // keep the reference: the package is still shown
		}
	}
	d.mu.Lock()
	delete(d.vols, id)
	delete(d.holds, id)
	errs = append(errs, d.rec.save(d.vols))
	d.mu.Unlock()
	if h != nil {
		errs = append(errs, h.Release())
	}
	return errors.Join(errs...)
}

// unpublish unmounts target, removes the directory, releases the
// volume's reference and forgets it. A volume it does not know is
// unmounted and removed all the same, and is no error (idempotent).
func (d *Driver) unpublish(id, target string) error {
	if err := d.claim(id); err != nil {
		return err
	}
	defer d.unclaim(id)
	d.mu.Lock()
	v := d.vols[id]
	d.mu.Unlock()
	if v != nil && v.Target != target {
		return status.Errorf(codes.InvalidArgument, "volume %s is published at %s, not %s", id, v.Target, target)
	}
	if err := unmountAll(target); err != nil {
		return status.Errorf(codes.Internal, "unpublish volume %s: %v", id, err)
	}
	// The spec: the plugin removes what it made at the target path.
	if err := os.Remove(target); err != nil && !os.IsNotExist(err) {
		return status.Errorf(codes.Internal, "unpublish volume %s: remove target: %v", id, err)
	}
	if v == nil {
		return nil
	}
	if err := d.forget(id); err != nil {
		d.log.Warn("unpublish: releasing the volume's reference", "volume", id, "err", err)
	}
	d.log.Info("volume unpublished", "volume", id, "package", v.Package, "holder", v.holder())
	return nil
}

// holdStatus is the gRPC status of a failed HoldFor, worded for the pod's
// events (kubelet shows the message there and retries with back-off).
func holdStatus(id string, err error) error {
	switch {
	case errors.Is(err, core.ErrPackageNotExist):
		return status.Errorf(codes.NotFound, "package %s is not available in the store (%v); kubelet retries until someone builds it", id, err)
	case errors.Is(err, core.ErrInvalidID):
		return status.Errorf(codes.InvalidArgument, "package %q: %v", id, err)
	case errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.DeadlineExceeded, "package %s: still being built when the call's deadline passed; kubelet retries (%v)", id, err)
	case errors.Is(err, context.Canceled):
		return status.Errorf(codes.Canceled, "package %s: %v", id, err)
	}
	return status.Errorf(codes.Unavailable, "package %s: cannot take a reference: %v", id, err)
}
