package cli

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

const cacheUsage = `usage: granary cache push [flags] ID
       granary cache pull [flags] ID

%s.

push  upload the published package ID to the remote cache (holding a
      reference while it is packed, so it cannot be removed meanwhile)
pull  make ID available from the remote cache, without building it: under
      the package's build lock, as a build would; exits 3 if the cache
      does not have it

The cache is --cache URL or $GRANARY_CACHE (http(s)://host/path, file:///dir).
Run 'granary build -h' for the connection flags.
`

// cmdCache is `granary cache push|pull ID`.
func cmdCache(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintf(e.stdout, cacheUsage, commands["cache"].short)
		return nil
	}
	if len(args) == 0 || (args[0] != "push" && args[0] != "pull") {
		return usageErr("cache", "want 'push' or 'pull'")
	}
	sub := args[0]
	f, err := e.newFlags("cache", false)
	if err != nil {
		return err
	}
	id, err := e.parseID(f, args[1:])
	if err != nil {
		return err
	}
	if f.cfg.Cache == "" {
		return usageErr("cache", "no remote cache: set --cache URL or $GRANARY_CACHE")
	}
	var cacheEvents eventLog
	c, err := e.connect(ctx, f.cfg, etcdstore.WithEvents(cacheEvents.add), etcdstore.WithPurpose("granary cache "+sub))
	if err != nil {
		return err
	}
	defer c.Close()
	if sub == "push" {
		return cachePush(ctx, e, c, id)
	}
	return cachePull(ctx, e, c, id, &cacheEvents)
}

func cachePush(ctx context.Context, e *env, c *conn, id string) error {
	h := c.store.Handle(id)
	if err := h.IncRefContext(ctx); err != nil {
		if errors.Is(err, core.ErrPackageNotExist) {
			return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache push: package %q does not exist", id)}
		}
		return err
	}
	defer h.DecRefContext(context.WithoutCancel(ctx)) //nolint:errcheck // Close drops the lease anyway
	info, err := c.store.Inspect(ctx, id)
	if err != nil {
		return err
	}
	if info.Package == nil {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache push: package %q does not exist", id)}
	}
	before := c.cache.Stats().BytesUp
	if err := c.cache.Store(ctx, id, h.OutputDirectory(), *info.Package); err != nil {
		return fmt.Errorf("granary: %w", err)
	}
	fmt.Fprintf(e.stderr, "granary: %s: pushed to %s (%d bytes)\n", id, c.cache, c.cache.Stats().BytesUp-before)
	return nil
}

func cachePull(ctx context.Context, e *env, c *conn, id string, ev *eventLog) error {
	out, err := c.store.Handle(id).BuildOutcome(ctx, func(context.Context) error {
		// Only reached when the cache did not provide the package: give
		// the attempt up, so that hosts waiting on it build it themselves.
		return fmt.Errorf("%w: not in the remote cache", etcdstore.ErrAbandon)
	})
	switch {
	case err == nil && out.How == etcdstore.FromCache:
		fmt.Fprintf(e.stderr, "granary: %s: fetched from %s\n", id, c.cache)
		return nil
	case err == nil:
		fmt.Fprintf(e.stderr, "granary: %s: already available\n", id)
		return nil
	case ctx.Err() != nil:
		return &ExitErr{Code: 130, Err: fmt.Errorf("granary: cache pull %q interrupted; nothing was published", id)}
	case errors.Is(err, etcdstore.ErrAbandon):
		if miss := ev.last(etcdstore.EventCacheMiss); miss != nil && miss.Err != nil {
			return fmt.Errorf("granary: cache pull: %q: %w", id, miss.Err)
		}
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: cache pull: %q is not in the remote cache %s", id, c.cache)}
	}
	return err
}

// eventLog keeps a store's events for a command to look at afterwards.
type eventLog struct {
	mu     sync.Mutex
	events []etcdstore.Event
}

func (l *eventLog) add(e etcdstore.Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
}

func (l *eventLog) last(kind etcdstore.EventKind) *etcdstore.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.events) - 1; i >= 0; i-- {
		if l.events[i].Kind == kind {
			e := l.events[i]
			return &e
		}
	}
	return nil
}

func (l *eventLog) has(kind etcdstore.EventKind) bool { return l.last(kind) != nil }
