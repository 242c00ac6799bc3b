package etcdstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// A lease revoked behind the session's back (an operator's etcdctl, or a
// thawed old leader revoking what it saw expire, etcd-io/etcd#15247) is
// replaced; Close then has nothing left to revoke of it, and that is not
// an error: the lease is gone, which is what Close is for.
func TestSessionCloseAfterLeaseRevoked(t *testing.T) {
	srv := etcdtest.Start(t)
	cli := srv.Client(t)
	restored := make(chan struct{}, 1)
	sess, err := etcdstore.NewSession(context.Background(), cli, etcdstore.SessionConfig{
		TTL: testTTL, OpTimeout: 5 * time.Second,
		OnRestored: func() { restored <- struct{}{} },
	})
	if err != nil {
		t.Fatal(err)
	}
	first := sess.ID()
	if _, err := cli.Revoke(context.Background(), first); err != nil {
		t.Fatal(err)
	}
	select {
	case <-restored:
	case <-time.After(10 * testTTL):
		t.Fatal("no new lease after the revocation")
	}
	if sess.ID() == first {
		t.Fatalf("lease %x still current after it was revoked", int64(first))
	}
	if err := sess.Close(); err != nil {
		t.Fatalf("Close = %v; want nil (the revoked lease is gone already)", err)
	}
}
