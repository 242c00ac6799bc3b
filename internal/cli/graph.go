package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// graphOps are the commands' ways to remove, pin, unpin, invalidate and
// explain a package: through the local node when one serves the
// configuration (the node checks the caller's privilege and acts with its
// own etcd credentials), else with a store of the command's own (the
// caller's etcd credentials govern it).
type graphOps interface {
	root() string
	tryRemove(ctx context.Context, id string) (bool, error)
	pin(ctx context.Context, id string, o etcdstore.PinOptions) (etcdstore.PinRecord, error)
	unpin(ctx context.Context, id string) (bool, error)
	invalidate(ctx context.Context, id, reason string) (etcdstore.InvalidateReport, error)
	why(ctx context.Context, id string) (*etcdstore.Why, error)
	// holders lists the local node's holders of id (nil without a node).
	holders(ctx context.Context, id string) []agent.Holder
	close()
}

// openGraph connects command f to the local node, or to etcd directly.
func (e *env) openGraph(ctx context.Context, f *flags) (graphOps, error) {
	ac, err := e.agentFor(ctx, f.cfg, "granary "+f.name, false)
	if err != nil {
		return nil, err
	}
	if ac != nil {
		return viaNode{ac}, nil
	}
	c, err := e.open(ctx, f)
	if err != nil {
		return nil, err
	}
	return direct{c}, nil
}

// viaNode is graphOps through the local node; its errors also wrap
// etcdstore's sentinels (node.StoreError).
type viaNode struct{ c *agent.Conn }

func (v viaNode) root() string { return v.c.Root() }
func (v viaNode) close()       { v.c.Close() }

func (v viaNode) tryRemove(ctx context.Context, id string) (bool, error) {
	ok, err := v.c.Handle(id).TryRemoveContext(ctx)
	return ok, node.StoreError(err)
}

func (v viaNode) pin(ctx context.Context, id string, o etcdstore.PinOptions) (etcdstore.PinRecord, error) {
	p, err := v.c.Pin(ctx, id, agent.PinOptions{For: o.For, Note: o.Note})
	return node.StorePin(p), node.StoreError(err)
}

func (v viaNode) unpin(ctx context.Context, id string) (bool, error) {
	ok, err := v.c.Unpin(ctx, id)
	return ok, node.StoreError(err)
}

func (v viaNode) invalidate(ctx context.Context, id, reason string) (etcdstore.InvalidateReport, error) {
	r, err := v.c.Invalidate(ctx, id, reason)
	return node.StoreInvalidateReport(r), node.StoreError(err)
}

func (v viaNode) why(ctx context.Context, id string) (*etcdstore.Why, error) {
	w, err := v.c.Why(ctx, id)
	if err != nil {
		return nil, node.StoreError(err)
	}
	return node.StoreWhy(*w), nil
}

func (v viaNode) holders(ctx context.Context, id string) []agent.Holder {
	_, hs, err := v.c.Inspect(ctx, id)
	if err != nil {
		return nil
	}
	return hs
}

// direct is graphOps with the command's own store.
type direct struct{ c *conn }

func (d direct) root() string { return d.c.store.Root() }
func (d direct) close()       { d.c.Close() }

func (d direct) tryRemove(ctx context.Context, id string) (bool, error) {
	return d.c.store.Handle(id).TryRemoveContext(ctx)
}

func (d direct) pin(ctx context.Context, id string, o etcdstore.PinOptions) (etcdstore.PinRecord, error) {
	return d.c.store.Pin(ctx, id, o)
}

func (d direct) unpin(ctx context.Context, id string) (bool, error) {
	return d.c.store.Unpin(ctx, id)
}

func (d direct) invalidate(ctx context.Context, id, reason string) (etcdstore.InvalidateReport, error) {
	return d.c.store.Invalidate(ctx, id, reason, "")
}

func (d direct) why(ctx context.Context, id string) (*etcdstore.Why, error) {
	return d.c.store.Why(ctx, id, etcdstore.DefaultHoldersWait)
}

func (d direct) holders(context.Context, string) []agent.Holder { return nil }

// openGraphID parses a command that takes one ID and opens its graphOps.
func (e *env) openGraphID(ctx context.Context, f *flags, args []string) (string, graphOps, error) {
	id, err := e.parseID(f, args)
	if err != nil {
		return "", nil, err
	}
	g, err := e.openGraph(ctx, f)
	if err != nil {
		return "", nil, err
	}
	return id, g, nil
}

// notExist is a command's error for a package that is not published: the
// store's error for an invalidated one (it names the operation, who
// invalidated the package and why).
func notExist(cmd, id string, err error) error {
	if errors.Is(err, core.ErrInvalidated) {
		return &ExitErr{Code: ExitNotExist, Err: err}
	}
	return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: %s: package %q does not exist", cmd, id)}
}

func cmdRm(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("rm", false)
	if err != nil {
		return err
	}
	id, g, err := e.openGraphID(ctx, f, args)
	if err != nil {
		return err
	}
	defer g.close()
	ok, err := g.tryRemove(ctx, id)
	switch {
	case errors.Is(err, core.ErrPackageNotExist):
		return notExist("rm", id, err)
	case err != nil:
		return err
	case ok:
		fmt.Fprintf(e.stderr, "granary: removed %s; its tree is in %s/.trash and is deleted in the background "+
			"(files still open on some host are kept until closed; 'granary gc' finishes and reports what is pending)\n", id, g.root())
		return nil
	}
	w, err := g.why(ctx, id)
	if err != nil {
		return fmt.Errorf("granary: rm %s refused: in use (and cannot say by whom: %w)", id, err)
	}
	return fmt.Errorf("granary: rm %s refused: %s", id, refusal(w))
}

// refusal says what keeps a package from rm, in one paragraph.
func refusal(w *etcdstore.Why) string {
	var parts []string
	if len(w.Refs) > 0 {
		var b strings.Builder
		fmt.Fprintf(&b, "referenced by %d holder(s):", len(w.Refs))
		for _, r := range w.Refs {
			fmt.Fprintf(&b, "\n  - %s", holder(r))
		}
		parts = append(parts, b.String())
	}
	if w.Pin != nil {
		parts = append(parts, pinText(w.Pin))
	}
	if len(w.NeededBy) > 0 {
		ids := make([]string, len(w.NeededBy))
		for i, d := range w.NeededBy {
			ids[i] = d.ID
		}
		parts = append(parts, "needed by "+strings.Join(ids, ", "))
	}
	if b := w.Build; b != nil {
		parts = append(parts, fmt.Sprintf("being built on %s (pid %d%s)", b.Host, b.PID, commandSuffix(b.Command)))
	}
	if len(parts) == 0 {
		return "its lock is held by a build or removal in progress; try again"
	}
	return strings.Join(parts, "; ")
}

// pinText is "pinned by USER on HOST until …: NOTE".
func pinText(p *etcdstore.PinRecord) string {
	s := fmt.Sprintf("pinned by %s on %s", p.By, p.Host)
	if p.Until.IsZero() {
		s += " until unpinned"
	} else {
		s += " until " + p.Until.Format(time.RFC3339)
	}
	if p.Note != "" {
		s += ": " + p.Note
	}
	return s
}

func cmdPin(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("pin", true)
	if err != nil {
		return err
	}
	var o etcdstore.PinOptions
	f.Var(node.NonNegative(&o.For), "for", "the pin expires after this long (0: until unpinned)")
	f.StringVar(&o.Note, "note", "", "why it is pinned, for people (shown by ls, inspect, why and rm's refusal)")
	id, g, err := e.openGraphID(ctx, f, args)
	if err != nil {
		return err
	}
	defer g.close()
	p, err := g.pin(ctx, id, o)
	switch {
	case errors.Is(err, core.ErrPackageNotExist):
		return notExist("pin", id, err)
	case err != nil:
		return err
	case f.json:
		return writeJSON(e.stdout, p)
	}
	fmt.Fprintf(e.stdout, "%s %s\n", id, pinText(&p))
	return nil
}

func cmdUnpin(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("unpin", false)
	if err != nil {
		return err
	}
	id, g, err := e.openGraphID(ctx, f, args)
	if err != nil {
		return err
	}
	defer g.close()
	ok, err := g.unpin(ctx, id)
	switch {
	case err != nil:
		return err
	case ok:
		fmt.Fprintf(e.stdout, "unpinned %s\n", id)
	default:
		fmt.Fprintf(e.stdout, "%s was not pinned\n", id)
	}
	return nil
}

func cmdInvalidate(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("invalidate", true)
	if err != nil {
		return err
	}
	var reason string
	f.StringVar(&reason, "reason", "", "why the package is bad (required): shown to every run refused, and by inspect, ls and why")
	id, err := e.parseID(f, args)
	if err != nil {
		return err
	}
	if strings.TrimSpace(reason) == "" {
		return usageErr("invalidate", "--reason is required: say why %s is bad", id)
	}
	g, err := e.openGraph(ctx, f)
	if err != nil {
		return err
	}
	defer g.close()
	rep, err := g.invalidate(ctx, id, reason)
	switch {
	case errors.Is(err, core.ErrPackageNotExist):
		return notExist("invalidate", id, err)
	case err != nil:
		return err
	case f.json:
		return writeJSON(e.stdout, rep)
	}
	fmt.Fprintf(e.stdout, "invalidated: %s\n", list(rep.Invalidated))
	fmt.Fprintf(e.stdout, "removed now: %s\n", list(rep.Removed))
	fmt.Fprintf(e.stdout, "held (removed when their last holder leaves): %s\n", list(rep.Held))
	return nil
}

func list(ids []string) string {
	if len(ids) == 0 {
		return "-"
	}
	return strings.Join(ids, ", ")
}

func cmdWhy(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("why", true)
	if err != nil {
		return err
	}
	id, g, err := e.openGraphID(ctx, f, args)
	if err != nil {
		return err
	}
	defer g.close()
	w, err := g.why(ctx, id)
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, w)
	}
	if w.State == etcdstore.StateAbsent && !w.Alive {
		return &ExitErr{Code: ExitNotExist, Err: fmt.Errorf("granary: why: package %q does not exist", id)}
	}
	if !w.Alive {
		fmt.Fprintf(e.stdout, "nothing keeps %s: rm would remove it\n", id)
		printWhyNotes(e.stdout, w, "")
		return nil
	}
	fmt.Fprintf(e.stdout, "%s (%s) is kept from removal by:\n", id, w.State)
	printWhy(e.stdout, w, "  ")
	if hs := g.holders(ctx, id); len(hs) > 0 {
		fmt.Fprintf(e.stdout, "  jobs holding it through this host's node:\n")
		for _, h := range hs {
			fmt.Fprintf(e.stdout, "    - uid %d pid %d since %s%s\n", h.UID, h.PID, h.Since.Format(time.RFC3339), commandSuffix(h.Purpose))
		}
	}
	return nil
}

// printWhy prints what keeps w's package, each line indented by ind, its
// dependents as an indented tree.
func printWhy(w io.Writer, y *etcdstore.Why, ind string) {
	for _, r := range y.Refs {
		fmt.Fprintf(w, "%sreference: %s\n", ind, holder(r))
	}
	if y.Pin != nil {
		fmt.Fprintf(w, "%s%s\n", ind, pinText(y.Pin))
	}
	if b := y.Build; b != nil {
		fmt.Fprintf(w, "%sa build in progress on %s (pid %d%s) since %s\n", ind, b.Host, b.PID, commandSuffix(b.Command), b.Started.Format(time.RFC3339))
	}
	for _, d := range y.NeededBy {
		switch {
		case d.Seen:
			fmt.Fprintf(w, "%sneeded by %s (explained above)\n", ind, d.ID)
		case d.Alive:
			fmt.Fprintf(w, "%sneeded by %s, which is kept by:\n", ind, d.ID)
			printWhy(w, d, ind+"    ")
		default:
			fmt.Fprintf(w, "%sneeded by %s, which nothing keeps (a gc removes it first, then what it needs)\n", ind, d.ID)
			printWhyNotes(w, d, ind+"    ")
		}
	}
	printWhyNotes(w, y, ind)
}

// printWhyNotes prints what does not keep a package from rm: its
// invalidation and the gc grace period.
func printWhyNotes(w io.Writer, y *etcdstore.Why, ind string) {
	if r := y.Invalid; r != nil {
		fmt.Fprintf(w, "%sinvalidated by %s on %s at %s: %s (no new reference; removed when nothing above keeps it)\n",
			ind, r.By, r.Host, r.At.Format(time.RFC3339), invalidReason(r))
	}
	if !y.GraceUntil.IsZero() {
		fmt.Fprintf(w, "%sgc grace until %s (only gc waits for it; rm does not)\n", ind, y.GraceUntil.Format(time.RFC3339))
	}
}

// invalidReason is an invalidation's reason, with its cause.
func invalidReason(r *etcdstore.InvalidRecord) string {
	if r.Cause != "" {
		return fmt.Sprintf("it needs %s, which was invalidated: %s", r.Cause, r.Reason)
	}
	return r.Reason
}
