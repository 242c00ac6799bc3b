package etcdstore

import (
	"context"
	"fmt"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestTransient(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"closed connection", status.Error(codes.Unavailable, "error reading from server: use of closed network connection"), true},
		{"wrapped", fmt.Errorf("read state: %w", status.Error(codes.Unavailable, "x")), true},
		{"leader changed", fmt.Errorf("lock: %w", rpctypes.ErrLeaderChanged), true},
		{"deadline", context.DeadlineExceeded, false},
		{"no leader", rpctypes.ErrNoLeader, false},
		{"build failed", &BuildError{ID: "x", Err: status.Error(codes.Unavailable, "x")}, true}, // build() checks BuildError itself
	} {
		if got := transient(tt.err); got != tt.want {
			t.Errorf("%s: transient(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}
