package etcdstore_test

import (
	"context"
	"testing"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/core/coretest"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

func TestConformance(t *testing.T) {
	coretest.TestPackageManager(t, func(t *testing.T, n int) []core.PackageManager {
		srv := etcdtest.Start(t)
		root := t.TempDir()
		pms := make([]core.PackageManager, n)
		for i := range pms {
			pms[i] = curated{newStore(t, srv, root)}
		}
		return pms
	})
}

// curated adapts a Store's pins and invalidation to coretest.Curator.
type curated struct{ *etcdstore.Store }

func (c curated) Pin(ctx context.Context, id string) error {
	_, err := c.Store.Pin(ctx, id, etcdstore.PinOptions{Note: "conformance"})
	return err
}

func (c curated) Unpin(ctx context.Context, id string) error {
	_, err := c.Store.Unpin(ctx, id)
	return err
}

func (c curated) Invalidate(ctx context.Context, id, reason string) error {
	_, err := c.Store.Invalidate(ctx, id, reason, "conformance")
	return err
}
