// Package sanity_test runs kubernetes-csi/csi-test's sanity suite against
// the CSI plugin. It is a package of its own because ginkgo leaves its
// interrupt handler (a signal goroutine) running after RunSpecs, which the
// goroutine-leak check of node/csidriver's tests would report.
package sanity_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"github.com/onsi/ginkgo/v2"
	"github.com/onsi/gomega"

	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
	"github.com/granary-build/granary/node/csidriver"
)

// TestCSISanity runs kubernetes-csi/csi-test's sanity suite against the
// driver's socket. What applies to a node-only plugin for ephemeral
// inline volumes runs and must pass:
//
//   - Identity Service: GetPluginCapabilities, Probe, GetPluginInfo;
//   - Node Service: NodeGetCapabilities, NodeGetInfo, and the argument
//     checks of NodePublishVolume (no volume ID, no target path, no
//     capability) and NodeUnpublishVolume (no volume ID, no target path).
//
// Not run (focus on "Identity Service" and "Node Service"): the
// Controller, GroupController and snapshot specs, which call a Controller
// service this plugin does not have. Skipped by the suite itself because
// the plugin says it lacks the capability: NodeStage/NodeUnstage, NodeGetVolumeStats,
// NodeExpandVolume, and "Node Service should work / should be
// idempotent" (they create a volume through a Controller). Skipped here
// by name: "NodeUnpublishVolume should remove target path", which also
// creates its volume through CreateVolume (a Controller call this plugin
// does not serve) and publishes it without the "package" attribute; the
// same behaviour (the target path is removed, repeats are no-ops) is
// checked with real packages in TestCSIPublishHoldsUntilUnpublish.
func TestCSISanity(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("!!! SKIPPED: the CSI sanity run mounts for real and needs root (euid 0); run it as root (CI does) !!!")
	}
	sock := startPlugin(t, etcdtest.Start(t))
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.IdempotentCount = 2
	cfg.ControllerAddress = "unix://" + noController(t, sock, sock+".ctl")

	sc := sanity.GinkgoTest(&cfg)
	defer sc.Finalize()
	gomega.RegisterFailHandler(ginkgo.Fail)
	suite, reporter := ginkgo.GinkgoConfiguration()
	// The Controller, GroupController and snapshot specs assume a
	// Controller service: only the Identity and Node ones apply.
	suite.FocusStrings = []string{"Identity Service", "Node Service"}
	suite.SkipStrings = []string{"NodeUnpublishVolume should remove target path"}
	reporter.NoColor = true
	reporter.Verbose = testing.Verbose()
	ginkgo.RunSpecs(t, "CSI sanity: granary's node plugin", suite, reporter)
}

// noController serves, on its own socket, the suite's "controller
// endpoint": a Controller service that can do nothing, and the plugin's
// own Identity service relayed from its socket. The suite's specs need
// both there: its Identity specs call the controller endpoint, and every
// Node spec's BeforeEach asks the Controller for its capabilities and
// fails on Unimplemented or an empty list. The plugin itself has no
// Controller (GetPluginCapabilities lists none; kubelet calls none for
// ephemeral volumes), so the answer "UNKNOWN only" comes from here.
func noController(t *testing.T, pluginSock, sock string) string {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+pluginSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	csi.RegisterControllerServer(srv, nothingController{})
	csi.RegisterIdentityServer(srv, identityRelay{c: csi.NewIdentityClient(conn)})
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln) //nolint:errcheck // ends with Stop
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
		conn.Close()
	})
	return sock
}

type nothingController struct {
	csi.UnimplementedControllerServer
}

func (nothingController) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	unknown := &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
		Rpc: &csi.ControllerServiceCapability_RPC{Type: csi.ControllerServiceCapability_RPC_UNKNOWN}}}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{unknown}}, nil
}

// identityRelay answers Identity calls with the plugin's own answers.
type identityRelay struct {
	csi.UnimplementedIdentityServer
	c csi.IdentityClient
}

func (r identityRelay) GetPluginInfo(ctx context.Context, req *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return r.c.GetPluginInfo(ctx, req)
}

func (r identityRelay) GetPluginCapabilities(ctx context.Context, req *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return r.c.GetPluginCapabilities(ctx, req)
}

func (r identityRelay) Probe(ctx context.Context, req *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return r.c.Probe(ctx, req)
}

// startPlugin runs a node of srv with its CSI plugin, as `granary serve
// --csi-endpoint` does, until the test ends, and returns its socket.
func startPlugin(t *testing.T, srv *etcdtest.Server) string {
	t.Helper()
	state, err := os.MkdirTemp("", "gcsi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	cfg := node.DefaultConfig()
	cfg.Endpoints = []string{srv.Endpoint}
	cfg.Root, cfg.StateDir, cfg.Name = t.TempDir(), state, "csi-sanity"
	cfg.GCInterval, cfg.IdleTimeout = 0, 0
	n, err := node.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatalf("node.New: %v", err)
	}
	sock := filepath.Join(state, "csi.sock")
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
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	select {
	case <-d.Ready():
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	}
	return sock
}
