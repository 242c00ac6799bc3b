package bench

import (
	"context"
	"fmt"
	"os"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// agentHosts: one store per host, served to the host's jobs by the node's
// local API (node.LocalAPI, the code `granary serve` runs) on a socket in a
// state directory of its own. A job connects, takes its reference through
// the node, and closes when it is done, as `granary run` does through the
// node: the node holds one etcd reference per package for all its jobs and
// releases it Linger after the last one.
func agentHosts(ctx context.Context, f *farm, n int) ([]farmHost, error) {
	hosts := make([]farmHost, n)
	for i := range n {
		api, state, err := f.agentHost(ctx, i)
		if err != nil {
			return nil, err
		}
		refs := api.LocalRefs()
		f.closes = append(f.closes, refs.Close)
		hosts[i] = socketHost{state, inProcessHost{refs}}
	}
	return hosts, nil
}

// inProcessHosts: the same hosts as agentHosts, the jobs taking their
// references in process through the LocalAPI's LocalRefs (the same
// aggregation, without the socket).
func inProcessHosts(ctx context.Context, f *farm, n int) ([]farmHost, error) {
	hosts := make([]farmHost, n)
	for i := range n {
		api, _, err := f.agentHost(ctx, i)
		if err != nil {
			return nil, err
		}
		refs := api.LocalRefs()
		f.closes = append(f.closes, refs.Close)
		hosts[i] = inProcessHost{refs}
	}
	return hosts, nil
}

// agentHost makes host i's store and serves its local API until the
// farm's closes run.
func (f *farm) agentHost(ctx context.Context, i int) (*node.LocalAPI, string, error) {
	name := fmt.Sprintf("host-%d", i)
	s, err := etcdstore.New(ctx, f.cli, f.root, f.storeOptions(name)...)
	if err != nil {
		return nil, "", err
	}
	f.closes = append(f.closes, s.Close)
	state, err := os.MkdirTemp("", "gf") // short: unix socket paths are limited
	if err != nil {
		return nil, "", err
	}
	f.closes = append(f.closes, func() error { return os.RemoveAll(state) })
	api, err := node.NewLocalAPI(s, f.agentConfig(name, state), nil)
	if err != nil {
		return nil, "", err
	}
	actx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- api.Run(actx) }()
	// Closed before the store (closes run in reverse order).
	f.closes = append(f.closes, func() error { cancel(); return <-done })
	return api, state, nil
}

// socketHost's jobs go through the socket; its prewarm takes in process
// (the host's state is the same either way).
type socketHost struct {
	state string
	inProcessHost
}

func (h socketHost) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	c, err := agent.Connect(ctx, h.state)
	if err != nil {
		return nil, err
	}
	p := c.Handle(id)
	if err := p.IncRefContext(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return func(ctx context.Context) error {
		err := p.DecRefContext(ctx)
		c.Close()
		return err
	}, nil
}

type inProcessHost struct{ refs *node.LocalRefs }

func (h inProcessHost) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	if err := h.refs.IncRef(ctx, id); err != nil {
		return nil, err
	}
	return func(context.Context) error { return h.refs.DecRef(id) }, nil
}

func (h inProcessHost) prewarm(ctx context.Context, id string) error {
	if err := h.refs.IncRef(ctx, id); err != nil {
		return err
	}
	return h.refs.DecRef(id)
}
