//go:build !linux

package cli

import "context"

// waitExit waits until process pid has exited, or ctx ends (polling).
func waitExit(ctx context.Context, pid int) error { return pollExit(ctx, pid) }
