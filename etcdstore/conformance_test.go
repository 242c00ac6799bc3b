package etcdstore_test

import (
	"testing"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/core/coretest"
	"github.com/granary-build/granary/internal/etcdtest"
)

func TestConformance(t *testing.T) {
	coretest.TestPackageManager(t, func(t *testing.T, n int) []core.PackageManager {
		srv := etcdtest.Start(t)
		root := t.TempDir()
		pms := make([]core.PackageManager, n)
		for i := range pms {
			pms[i] = newStore(t, srv, root)
		}
		return pms
	})
}
