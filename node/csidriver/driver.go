package csidriver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/node"
)

// DefaultName is the CSI driver name: the CSIDriver object's name and the
// name kubelet registers the plugin under.
const DefaultName = "csi.granary.build"

// Volume attributes a pod's CSI volume source may set
// (volumeAttributes), and those kubelet adds with podInfoOnMount.
const (
	// AttrPackage names the package to show (required).
	AttrPackage = "package"
	// AttrSubPath shows only this directory of the package's contents (a
	// relative path that stays inside them).
	AttrSubPath = "subPath"

	attrPodName        = "csi.storage.k8s.io/pod.name"
	attrPodNamespace   = "csi.storage.k8s.io/pod.namespace"
	attrPodUID         = "csi.storage.k8s.io/pod.uid"
	attrServiceAccount = "csi.storage.k8s.io/serviceAccount.name"
)

// Config says where the Driver serves and under which name.
type Config struct {
	// Endpoint is the gRPC endpoint, unix:///path/csi.sock (or a bare
	// absolute path): the socket kubelet's registrar points at.
	Endpoint string
	// Name is the driver name (DefaultName).
	Name string
}

// DefaultConfig returns a Config with the default name and no endpoint.
func DefaultConfig() Config { return Config{Name: DefaultName} }

// Validate reports a bad value.
func (c Config) Validate() error {
	if _, err := socketPath(c.Endpoint); err != nil {
		return err
	}
	if c.Name == "" || strings.ContainsAny(c.Name, "/ ") {
		return fmt.Errorf("csi: bad driver name %q", c.Name)
	}
	return nil
}

// socketPath is the unix socket path of an endpoint.
func socketPath(endpoint string) (string, error) {
	p := endpoint
	switch {
	case strings.HasPrefix(p, "unix://"):
		p = strings.TrimPrefix(p, "unix://")
	case strings.HasPrefix(p, "unix:"):
		p = strings.TrimPrefix(p, "unix:")
	case strings.Contains(p, "://"):
		return "", fmt.Errorf("csi: endpoint %q: only unix sockets are served (unix:///path)", endpoint)
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("csi: endpoint %q: want an absolute socket path (unix:///path)", endpoint)
	}
	return p, nil
}

// Driver is the CSI node plugin of one node. Make it with New, call
// Recover before Run, and Run it for as long as the node runs.
//
// Invariants (all guarded by mu): vols is what recordFile holds; every
// volume in vols whose publish completed has its Hold in holds; busy has
// an entry while one call publishes or unpublishes that volume ID, and no
// other call touches the volume meanwhile (a second one gets
// codes.Aborted, which the spec allows and kubelet retries). I/O (etcd,
// mounts) is done without mu, by the owner of the volume's busy entry.
type Driver struct {
	cfg  Config
	n    *node.Node
	log  *slog.Logger
	rec  recordFile
	sock string

	mu    sync.Mutex
	vols  map[string]*volume
	holds map[string]*node.Hold
	busy  map[string]bool

	ready chan struct{} // closed once Run listens
}

// New makes the Driver of n. It reads nothing and serves nothing yet.
func New(n *node.Node, cfg Config, log *slog.Logger) (*Driver, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sock, _ := socketPath(cfg.Endpoint)
	return &Driver{
		cfg: cfg, n: n, log: log.With("part", "csi"), sock: sock,
		rec:   recordFile{path: filepath.Join(n.Config().StateDir, "csi", "volumes.json")},
		vols:  map[string]*volume{},
		holds: map[string]*node.Hold{},
		busy:  map[string]bool{},
		ready: make(chan struct{}),
	}, nil
}

// Recover reads the Driver's record of published volumes and checks it
// against the mount table: a volume still mounted gets its reference back
// (before Run serves anything, so kubelet never sees a volume the node
// does not hold); a record without its mount (its pod gone, or a publish
// cut short) is dropped; a mount whose package is no longer in the store
// is unmounted and dropped. It fails if etcd cannot say (the node is then
// of no use to kubelet either).
func (d *Driver) Recover(ctx context.Context) error {
	vols, err := d.rec.load()
	if err != nil {
		return err
	}
	mounts, err := mountPoints()
	if err != nil {
		return err
	}
	keep := map[string]*volume{}
	for id, v := range vols {
		if !mounts[v.Target] {
			d.log.Info("dropping the record of a volume that is no longer mounted", "volume", id, "package", v.Package, "target", v.Target)
			continue
		}
		h, err := d.n.HoldForPod(ctx, v.Package, v.podName(), v.holder())
		switch {
		case errors.Is(err, core.ErrPackageNotExist):
			d.log.Error("a published volume's package is no longer in the store; unmounting it", "volume", id, "package", v.Package, "target", v.Target)
			if err := unmountAll(v.Target); err != nil {
				d.log.Warn("unmount failed", "target", v.Target, "err", err)
			}
			continue
		case err != nil:
			d.releaseAll()
			return fmt.Errorf("csi: take the reference of volume %s (package %s) again: %w", id, v.Package, err)
		}
		keep[id] = v
		d.mu.Lock()
		d.holds[id] = h
		d.mu.Unlock()
		d.log.Info("published volume recovered", "volume", id, "package", v.Package, "holder", v.holder())
	}
	d.mu.Lock()
	d.vols = keep
	d.mu.Unlock()
	return d.rec.save(keep)
}

// releaseAll drops every Hold (Recover's failure path).
func (d *Driver) releaseAll() {
	d.mu.Lock()
	holds := d.holds
	d.holds = map[string]*node.Hold{}
	d.mu.Unlock()
	for _, h := range holds {
		h.Release() //nolint:errcheck // held, so it cannot fail
	}
}

// Run serves the Identity and Node services on the endpoint until ctx
// ends, then stops the server: calls in progress get up to five seconds
// to finish, then are cut. Published volumes stay mounted and recorded,
// and their references end with the node (the next Recover takes them
// again).
func (d *Driver) Run(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(d.sock), 0o755); err != nil {
		return fmt.Errorf("csi: socket directory: %w", err)
	}
	if err := os.Remove(d.sock); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("csi: remove stale socket: %w", err)
	}
	ln, err := net.Listen("unix", d.sock)
	if err != nil {
		return fmt.Errorf("csi: listen: %w", err)
	}
	close(d.ready)
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.logCall))
	csi.RegisterIdentityServer(srv, identity{d: d})
	csi.RegisterNodeServer(srv, nodeServer{d: d})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	d.log.Info("CSI node plugin serving", "endpoint", d.cfg.Endpoint, "driver", d.cfg.Name)
	select {
	case err = <-served:
		err = fmt.Errorf("csi: serve: %w", err)
	case <-ctx.Done():
		stopped := make(chan struct{})
		go func() { srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			srv.Stop()
			<-stopped
		}
		<-served
	}
	return err
}

// Ready is closed once Run listens on the endpoint.
func (d *Driver) Ready() <-chan struct{} { return d.ready }

// Serve runs the node and the Driver together until ctx ends or either
// fails: Recover must have been called (the references of the volumes
// published before a restart are taken before anything serves). It stops
// in this order: the Driver (its calls in progress finish or are cut),
// then the node (node.Node.Run's own order), whose store the Driver's
// calls need. It returns the errors of both.
func (d *Driver) Serve(ctx context.Context) error {
	nctx, stopNode := context.WithCancel(context.WithoutCancel(ctx))
	defer stopNode()
	dctx, stopDriver := context.WithCancel(ctx)
	defer stopDriver()
	done := make(chan error, 1)
	go func() {
		err := d.Run(dctx)
		stopNode() // the node outlives the Driver
		done <- err
	}()
	nodeErr := d.n.Run(nctx)
	stopDriver() // the node failed: the Driver goes too
	return errors.Join(<-done, nodeErr)
}

// logCall logs every failed call, as kubelet shows it in the pod's events.
func (d *Driver) logCall(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		d.log.Warn("CSI call failed", "method", info.FullMethod, "err", err)
	} else {
		d.log.Debug("CSI call", "method", info.FullMethod)
	}
	return resp, err
}

// Published lists the volumes the Driver holds and has mounted, by
// volume ID, with the package each shows (for tests and inspection).
func (d *Driver) Published() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]string, len(d.holds))
	for id := range d.holds {
		out[id] = d.vols[id].Package
	}
	return out
}
