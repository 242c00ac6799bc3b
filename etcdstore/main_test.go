package etcdstore_test

import (
	"context"
	"os"
	"testing"
	"time"

	"strings"

	"go.etcd.io/etcd/client/pkg/v3/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	testutil.MustTestMainWithLeakDetection(m)
}

// testTTL is the shortest TTL the store accepts: expiry tests wait for it.
const testTTL = 3 * time.Second

// newStoreB is newStore for benchmarks.
func newStoreB(b *testing.B, srv *etcdtest.Server) *etcdstore.Store {
	b.Helper()
	cli := srv.Client(b)
	s, err := etcdstore.New(context.Background(), cli, b.TempDir(), etcdstore.WithTTL(testTTL))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close(); cli.Close() })
	return s
}

func buildB(b *testing.B, s *etcdstore.Store, id string) {
	b.Helper()
	if err := s.Handle(id).Build(func() error { return nil }); err != nil {
		b.Fatal(err)
	}
}

// newStore opens a store on its own client of srv, closed at cleanup.
func newStore(t *testing.T, srv *etcdtest.Server, root string, opts ...etcdstore.Option) *etcdstore.Store {
	t.Helper()
	cli := srv.Client(t)
	opts = append([]etcdstore.Option{etcdstore.WithTTL(testTTL), etcdstore.WithLockDelay(200 * time.Millisecond)}, opts...)
	s, err := etcdstore.New(context.Background(), cli, root, opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close(); cli.Close() })
	return s
}

func clientv3New(cfg clientv3.Config) (*clientv3.Client, error) { return clientv3.New(cfg) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }
