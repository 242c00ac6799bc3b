//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/granary-build/granary/internal/netfstest"
)

// newNetFSCluster mounts one export three times on the host through sshfs
// (NFS-like options, allow_other) and starts the cluster with each worker on
// its own mount (docker-compose.netfs.yml).
func newNetFSCluster(t *testing.T, o clusterOpts) (*cluster, *netfstest.Export) {
	t.Helper()
	e := netfstest.Mount(t, netfstest.Config{Options: netfstest.NFSLike, AllowOther: true})
	o.files = append(o.files, filepath.Join(repoRoot, "docker-compose.netfs.yml"))
	o.env = append(o.env, "GRANARY_NETFS="+e.Work)
	o.netfs = true
	c := newCluster(t, o)
	if r := c.sh("worker1", "grep ' /shared ' /proc/mounts"); r.code != 0 || !strings.Contains(r.out, "fuse.sshfs") {
		t.Fatalf("worker1's /shared is not the sshfs mount: %s", r)
	}
	t.Logf("each worker's /shared is its own sshfs mount of %s", e.Dir)
	return c, e
}

// TestNetFS runs the build-once scenario with each worker on its own
// NFS-like client of the shared root, then hangs one worker's file server
// (SIGSTOP of its sshfs): the other workers keep building and running, and
// the hung worker's build finishes once its server answers again.
func TestNetFS(t *testing.T) {
	c, e := newNetFSCluster(t, clusterOpts{})
	buildOnce(t, c, "once", 5)

	// A hung file server for worker3.
	e.Stop(2)
	stopped := true
	defer func() {
		if stopped {
			e.Continue(2)
		}
	}()
	hung := c.background("worker3", "build", "hung", "--", "sh", "-c", `echo from-worker3 > "$GRANARY_OUT/f"`)
	c.must("worker1", "build", "other", "--", "sh", "-c", `echo from-worker1 > "$GRANARY_OUT/f"`)
	if r := c.granary("worker2", "run", "other", "--", "sh", "-c", `cat "$GRANARY_PKG/f"`); r.code != 0 || strings.TrimSpace(r.out) != "from-worker1" {
		t.Fatalf("worker2 runs a package while worker3's server hangs: %s", r)
	}
	select {
	case r := <-hung:
		t.Logf("worker3's build while its server hangs ended: %s", r)
	case <-time.After(2 * ttl):
		t.Logf("worker3's build still hangs after %v (hard mount: it waits for its server)", 2*ttl)
	}
	e.Continue(2)
	stopped = false
	r := c.wait(hung, takeover, "worker3's build after its server came back")
	t.Logf("worker3's build after its server came back: %s", r)
	if r.code != 0 {
		t.Errorf("worker3's build failed after its server came back: %s", r)
	}
	c.must("worker1", "verify", "hung")
}
