//go:build e2e

package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/granary-build/granary/etcdstore"
)

// TestTLSAuth: over client TLS with etcd auth (the certificate's CN is the
// user), build-once and references work; clients without a certificate,
// with one from another CA, or with one whose CN is no etcd user are
// refused with a clear error.
func TestTLSAuth(t *testing.T) {
	certs := t.TempDir()
	if err := WriteCerts(certs); err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, clusterOpts{
		files: []string{filepath.Join(repoRoot, "docker-compose.tls.yml")},
		env:   []string{"GRANARY_CERTS=" + certs},
		only:  []string{"etcd1", "etcd2", "etcd3"},
	})
	port, err := c.compose(context.Background(), "port", "etcd1", "2379")
	if err != nil {
		t.Fatalf("compose port: %v %s", err, port)
	}
	if err := EnableAuth(context.Background(), "https://"+strings.TrimSpace(port), certs, etcdstore.DefaultPrefix); err != nil {
		t.Fatal(err)
	}
	c.up()

	buildOnce(t, c, "tls-once", 4)

	// worker3's node lingers on tls-once after buildOnce's jobs there.
	holder := c.background("worker2", "run", "tls-once", "--", "sleep", "1004")
	c.waitRefs("tls-once", "worker2", "worker3")
	// The rm asks both nodes to let go: worker3's does, worker2's job keeps it.
	if r := c.granary("worker1", "rm", "tls-once"); r.code == 0 || !strings.Contains(r.out, "worker2") {
		t.Fatalf("rm under worker2's reference: %s; want refused naming worker2", r)
	}
	c.killMatching("worker2", "sleep 1004")
	c.wait(holder, takeover, "run after its command was killed")
	// worker2's node keeps its etcd reference for the linger (10 min)
	// after its last local holder ended; worker1's rm asks it to let go
	// (P/yield, under the same auth as every key). The node may not have
	// seen its job's connection end yet when the first rm asks: retried.
	c.eventually(takeover, "rm of a package worker2 only lingers on", func() (bool, string) {
		r := c.granary("worker1", "rm", "tls-once")
		return r.code == 0, r.String()
	})

	for _, bad := range []struct {
		name string
		env  []string
		want string // in the error
	}{
		{"no client certificate", []string{"GRANARY_CERT=", "GRANARY_KEY="}, "certificate"},
		{"certificate from another CA", []string{"GRANARY_CERT=/certs/rogue.pem", "GRANARY_KEY=/certs/rogue-key.pem"}, "certificate"},
		{"CN that is no etcd user", []string{"GRANARY_CERT=/certs/intruder.pem", "GRANARY_KEY=/certs/intruder-key.pem"}, "refused the client certificate's CN read access"},
	} {
		args := append([]string{"env"}, bad.env...)
		args = append(args, "granary", "serve", "--host", "intruder", "--state-dir", "/tmp/intruder", "--listen-metrics", "")
		ctx, cancel := context.WithTimeout(context.Background(), takeover)
		r := c.exec(ctx, "worker3", args...)
		cancel()
		t.Logf("%s: %s", bad.name, r)
		if r.code == 0 || r.code == -1 {
			t.Errorf("%s: a node started: %s", bad.name, r)
		} else if !strings.Contains(r.out, bad.want) {
			t.Errorf("%s: error does not mention %q: %s", bad.name, bad.want, r)
		}
	}
}
