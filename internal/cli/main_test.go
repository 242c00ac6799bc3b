package cli

import (
	"testing"

	"go.etcd.io/etcd/client/pkg/v3/testutil"

	"github.com/granary-build/granary/internal/reaper"
)

func TestMain(m *testing.M) {
	reaper.Main() // builders run under a guard that re-executes this binary
	testutil.MustTestMainWithLeakDetection(m)
}
