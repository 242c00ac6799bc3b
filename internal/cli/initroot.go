package cli

import (
	"context"
	"fmt"

	"github.com/granary-build/granary/etcdstore"
)

// cmdInitRoot makes --root the shared root of the prefix explicitly: the
// first root of a prefix is bound on first use, but replacing a prefix's
// root (a new volume) must be asked for, so that a host whose volume is not
// mounted never binds its empty mount point by accident.
func cmdInitRoot(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("init-root", false)
	if err != nil {
		return err
	}
	pos, cmd, err := e.parse(f, args)
	if err != nil {
		return err
	}
	if len(pos)+len(cmd) != 0 {
		return usageErr("init-root", "takes no arguments (set the root with --root)")
	}
	c, err := e.connect(ctx, f.cfg, etcdstore.WithInitRoot(true))
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Fprintf(e.stderr, "granary: %s is the shared root of prefix %q\n", c.store.Root(), c.store.Prefix())
	return nil
}
