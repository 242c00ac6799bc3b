package csidriver_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"go.etcd.io/etcd/client/pkg/v3/testutil"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
	"github.com/granary-build/granary/node/csidriver"
)

func TestMain(m *testing.M) { testutil.MustTestMainWithLeakDetection(m) }

// requireRoot skips, loudly, where bind mounts cannot be made: these
// tests mount for real and CI runs them as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("!!! SKIPPED: the CSI tests make real bind mounts and need root (euid 0); run them as root (CI does) !!!")
	}
}

// shortDir is a directory with a short path (unix sockets), removed at
// the end.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "gcsi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// plugin is a node of srv with its CSI driver, served until stop.
type plugin struct {
	n    *node.Node
	d    *csidriver.Driver
	node csi.NodeClient
	id   csi.IdentityClient
	sock string
	stop func() error
}

// nodeConfig is a node of srv on root with state directory state, no
// linger (the last unpublish releases the host's reference at once).
func nodeConfig(srv *etcdtest.Server, root, state string) node.Config {
	cfg := node.DefaultConfig()
	cfg.Endpoints = []string{srv.Endpoint}
	cfg.Root, cfg.StateDir, cfg.Name = root, state, "csi-node"
	cfg.GCInterval, cfg.IdleTimeout, cfg.Linger = 0, 0, 0
	return cfg
}

// startPlugin makes the node and its driver, recovers, and serves as
// `granary serve --csi-endpoint` does; Cleanup stops it.
func startPlugin(t *testing.T, cfg node.Config) *plugin {
	t.Helper()
	n, err := node.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("node.New: %v", err)
	}
	sock := filepath.Join(cfg.StateDir, "csi.sock")
	d, err := csidriver.New(n, csidriver.Config{Endpoint: "unix://" + sock, Name: csidriver.DefaultName}, nil)
	if err == nil {
		err = d.Recover(context.Background())
	}
	if err != nil {
		n.Close()
		t.Fatalf("driver: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	select {
	case <-d.Ready():
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p := &plugin{n: n, d: d, node: csi.NewNodeClient(conn), id: csi.NewIdentityClient(conn), sock: sock}
	var stopped bool
	var runErr error
	p.stop = func() error {
		if !stopped {
			stopped = true
			conn.Close()
			cancel()
			runErr = <-done
		}
		return runErr
	}
	t.Cleanup(func() {
		if err := p.stop(); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return p
}

// otherHost is a store of another host on srv.
func otherHost(t *testing.T, srv *etcdtest.Server, root string) *etcdstore.Store {
	t.Helper()
	s, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithHost("other"), etcdstore.WithTTL(3*time.Second))
	if err != nil {
		t.Fatalf("etcdstore.New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// buildPkg builds id on s with a file f and a directory sub/ holding g.
func buildPkg(t *testing.T, s *etcdstore.Store, id string) {
	t.Helper()
	h := s.Handle(id)
	err := h.BuildContext(context.Background(), func(context.Context) error {
		out := h.OutputDirectory()
		if err := os.MkdirAll(filepath.Join(out, "sub"), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(out, "sub", "g"), []byte("g of "+id), 0o644); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(out, "f"), []byte("f of "+id), 0o644)
	})
	if err != nil {
		t.Fatalf("build %s: %v", id, err)
	}
}

// publishReq is kubelet's request for an ephemeral inline volume of pod
// ns/name showing pkg at target.
func publishReq(volID, target, pkg string, extra map[string]string) *csi.NodePublishVolumeRequest {
	attrs := map[string]string{
		"package":                          pkg,
		"csi.storage.k8s.io/ephemeral":     "true",
		"csi.storage.k8s.io/pod.name":      "job-" + volID,
		"csi.storage.k8s.io/pod.namespace": "farm",
		"csi.storage.k8s.io/pod.uid":       "uid-" + volID,
	}
	for k, v := range extra {
		attrs[k] = v
	}
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
		},
		Readonly:      true,
		VolumeContext: attrs,
	}
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatalf("read through the volume: %v", err)
	}
	return string(b)
}

func mounted(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

// holders returns the purposes of the node's local holders of id.
func holders(n *node.Node, id string) string {
	var out []string
	for _, h := range n.Holders(id) {
		out = append(out, h.Purpose)
	}
	return strings.Join(out, "; ")
}

func TestCSIPublishHoldsUntilUnpublish(t *testing.T) {
	requireRoot(t)
	srv := etcdtest.Start(t)
	root := t.TempDir()
	p := startPlugin(t, nodeConfig(srv, root, shortDir(t)))
	other := otherHost(t, srv, root)
	buildPkg(t, other, "tool-1")
	ctx := context.Background()
	target := filepath.Join(t.TempDir(), "pods", "uid-v1", "mount")

	req := publishReq("v1", target, "tool-1", nil)
	for i := range 2 { // idempotent: the second call changes nothing
		if _, err := p.node.NodePublishVolume(ctx, req); err != nil {
			t.Fatalf("publish #%d: %v", i+1, err)
		}
	}
	if got := readFile(t, filepath.Join(target, "f")); got != "f of tool-1" {
		t.Errorf("read through the target: got %q, want %q", got, "f of tool-1")
	}
	err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644)
	if !errors.Is(err, unix.EROFS) {
		t.Errorf("write through the target: got %v, want EROFS", err)
	}
	if got, want := holders(p.n, "tool-1"), "pod farm/job-v1 (uid uid-v1, CSI volume v1)"; got != want {
		t.Errorf("the node's holders: got %q, want %q", got, want)
	}
	if ok, err := other.Handle("tool-1").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove from another host while published: got (%v, %v), want (false, nil)", ok, err)
	}
	// Another host sees the pod in the node's reference.
	if info, err := other.Inspect(ctx, "tool-1"); err != nil || len(info.Refs) != 1 || !slices.Equal(info.Refs[0].Pods, []string{"farm/job-v1"}) {
		t.Errorf("inspect from another host: %+v, %v; want the node's reference naming pod farm/job-v1", info.Refs, err)
	}
	// A sub-path: only sub/ of the package.
	subTarget := filepath.Join(t.TempDir(), "sub")
	if _, err := p.node.NodePublishVolume(ctx, publishReq("v2", subTarget, "tool-1", map[string]string{"subPath": "sub"})); err != nil {
		t.Fatalf("publish with subPath: %v", err)
	}
	if got := readFile(t, filepath.Join(subTarget, "g")); got != "g of tool-1" {
		t.Errorf("read through the sub-path: got %q", got)
	}
	for i := range 2 {
		for _, v := range []struct{ id, target string }{{"v1", target}, {"v2", subTarget}} {
			if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
				t.Fatalf("unpublish %s #%d: %v", v.id, i+1, err)
			}
			if mounted(t, v.target) {
				t.Errorf("%s still mounted after unpublish", v.target)
			}
			if _, err := os.Stat(v.target); !os.IsNotExist(err) {
				t.Errorf("target %s after unpublish: %v, want it removed", v.target, err)
			}
		}
	}
	if got := holders(p.n, "tool-1"); got != "" {
		t.Errorf("holders after unpublish: %q, want none", got)
	}
	if ok, err := other.Handle("tool-1").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove from another host after unpublish: got (%v, %v), want (true, nil)", ok, err)
	}
}

func TestCSIPublishRefusals(t *testing.T) {
	requireRoot(t)
	srv := etcdtest.Start(t)
	root := t.TempDir()
	p := startPlugin(t, nodeConfig(srv, root, shortDir(t)))
	buildPkg(t, otherHost(t, srv, root), "tool-1")
	ctx := context.Background()
	dir := t.TempDir()
	tests := []struct {
		name    string
		req     *csi.NodePublishVolumeRequest
		code    codes.Code
		message string
	}{
		{"missing package", publishReq("m1", filepath.Join(dir, "m1"), "cpython-3.12", nil), codes.NotFound,
			"package cpython-3.12 is not available in the store"},
		{"no package attribute", publishReq("m2", filepath.Join(dir, "m2"), "", nil), codes.InvalidArgument, `"package" is required`},
		{"sub-path climbing out", publishReq("m3", filepath.Join(dir, "m3"), "tool-1", map[string]string{"subPath": "../.."}), codes.InvalidArgument, "leaves"},
		{"sub-path not in the package", publishReq("m4", filepath.Join(dir, "m4"), "tool-1", map[string]string{"subPath": "nope"}), codes.InvalidArgument, "not in package"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.node.NodePublishVolume(ctx, tc.req)
			if st := status.Convert(err); st.Code() != tc.code || !strings.Contains(st.Message(), tc.message) {
				t.Fatalf("got %v, want code %v with %q", err, tc.code, tc.message)
			}
			if mounted(t, tc.req.TargetPath) {
				t.Errorf("a failed publish left a mount at %s", tc.req.TargetPath)
			}
		})
	}
	if got := p.d.Published(); len(got) != 0 {
		t.Errorf("published after failures: %v, want none", got)
	}
	if got := holders(p.n, "tool-1"); got != "" {
		t.Errorf("holders after failed publishes: %q, want none", got)
	}
}

func TestCSIPublishWaitsForBuild(t *testing.T) {
	requireRoot(t)
	srv := etcdtest.Start(t)
	root := t.TempDir()
	waiting := make(chan struct{}, 1)
	cfg := nodeConfig(srv, root, shortDir(t))
	cfg.Events = func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventWaiting && e.ID == "slow-1" {
			select {
			case waiting <- struct{}{}:
			default:
			}
		}
	}
	p := startPlugin(t, cfg)
	other := otherHost(t, srv, root)
	release, building := make(chan struct{}), make(chan struct{})
	built := make(chan error, 1)
	go func() {
		h := other.Handle("slow-1")
		built <- h.BuildContext(context.Background(), func(context.Context) error {
			close(building)
			<-release
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("f of slow-1"), 0o644)
		})
	}()
	<-building
	target := filepath.Join(t.TempDir(), "mnt")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	published := make(chan error, 1)
	go func() {
		_, err := p.node.NodePublishVolume(ctx, publishReq("w1", target, "slow-1", nil))
		published <- err
	}()
	select { // the publish waits for the build, as the store reports
	case <-waiting:
	case err := <-published:
		t.Fatalf("publish returned before the build ended: %v", err)
	}
	close(release)
	if err := <-built; err != nil {
		t.Fatalf("build: %v", err)
	}
	if err := <-published; err != nil {
		t.Fatalf("publish that waited for the build: %v", err)
	}
	if got := readFile(t, filepath.Join(target, "f")); got != "f of slow-1" {
		t.Errorf("read: got %q", got)
	}
	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "w1", TargetPath: target}); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
}

func TestCSIRestartKeepsReference(t *testing.T) {
	requireRoot(t)
	srv := etcdtest.Start(t)
	root, state := t.TempDir(), shortDir(t)
	p := startPlugin(t, nodeConfig(srv, root, state))
	other := otherHost(t, srv, root)
	buildPkg(t, other, "tool-1")
	buildPkg(t, other, "tool-2")
	ctx := context.Background()
	keep := filepath.Join(t.TempDir(), "keep")
	gone := filepath.Join(t.TempDir(), "gone")
	for _, r := range []*csi.NodePublishVolumeRequest{publishReq("k1", keep, "tool-1", nil), publishReq("g1", gone, "tool-2", nil)} {
		if _, err := p.node.NodePublishVolume(ctx, r); err != nil {
			t.Fatalf("publish %s: %v", r.VolumeId, err)
		}
	}
	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	// While the node is down, one pod's mount goes (its pod was deleted
	// and its directory cleaned up); the other stays.
	if err := unix.Unmount(gone, 0); err != nil {
		t.Fatal(err)
	}
	p2 := startPlugin(t, nodeConfig(srv, root, state))
	if got, want := p2.d.Published(), map[string]string{"k1": "tool-1"}; len(got) != 1 || got["k1"] != want["k1"] {
		t.Fatalf("published after restart: %v, want %v", got, want)
	}
	if got, want := holders(p2.n, "tool-1"), "pod farm/job-k1 (uid uid-k1, CSI volume k1)"; got != want {
		t.Errorf("holders after restart: got %q, want %q", got, want)
	}
	if ok, err := other.Handle("tool-1").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove of the recovered volume's package: got (%v, %v), want (false, nil)", ok, err)
	}
	if ok, err := other.Handle("tool-2").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove of the package whose mount went: got (%v, %v), want (true, nil)", ok, err)
	}
	if got := readFile(t, filepath.Join(keep, "f")); got != "f of tool-1" {
		t.Errorf("read after restart: %q", got)
	}
	if _, err := p2.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "k1", TargetPath: keep}); err != nil {
		t.Fatalf("unpublish after restart: %v", err)
	}
	if ok, err := other.Handle("tool-1").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove after unpublish: got (%v, %v), want (true, nil)", ok, err)
	}
}
