package bench

import (
	"context"
	"fmt"
	"os"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

func init() { farmModes = append(farmModes, farmMode{name: "agent", hosts: agentHosts}) }

// agentHosts: one store per host, served to the host's jobs by the node's
// local API (node.LocalAPI, the code `granary serve` runs) on a socket in a
// state directory of its own. A job connects, takes its reference through
// the node, and closes when it is done, as `granary run` does through the
// node: the node holds one etcd reference per package for all its jobs and
// releases it Linger after the last one.
func agentHosts(ctx context.Context, f *farm, n int) ([]farmHost, error) {
	hosts := make([]farmHost, n)
	for i := range n {
		name := fmt.Sprintf("host-%d", i)
		s, err := etcdstore.New(ctx, f.cli, f.root, f.storeOptions(name)...)
		if err != nil {
			return nil, err
		}
		f.closes = append(f.closes, s.Close)
		state, err := os.MkdirTemp("", "gf") // short: unix socket paths are limited
		if err != nil {
			return nil, err
		}
		f.closes = append(f.closes, func() error { return os.RemoveAll(state) })
		cfg := node.DefaultConfig()
		cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name = state, f.root, f.prefix, name
		cfg.Linger = f.cfg.Linger
		api, err := node.NewLocalAPI(s, cfg, nil)
		if err != nil {
			return nil, err
		}
		actx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- api.Run(actx) }()
		// Closed before the store (closes run in reverse order).
		f.closes = append(f.closes, func() error { cancel(); return <-done })
		hosts[i] = agentHost{state}
	}
	return hosts, nil
}

type agentHost struct{ state string }

func (h agentHost) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	c, err := node.Connect(ctx, h.state)
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
