package bench

import (
	"context"
	"strings"
	"sync/atomic"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
)

// Counter counts the unary etcd requests of the clients it is installed on
// (as a gRPC interceptor inside the client's own retry interceptor, so each
// attempt sent counts). A write is a Put, a DeleteRange, or a Txn with a
// put or delete in either branch (which branch ran is not known here); a
// read is a Range or a Txn of gets only. Watches and lease keep-alives are
// streams and are not counted.
type Counter struct {
	reads, writes, other atomic.Int64
}

// Counts is a snapshot of a Counter.
type Counts struct{ Reads, Writes, Other int64 }

// Snapshot returns the counts so far.
func (c *Counter) Snapshot() Counts {
	return Counts{c.reads.Load(), c.writes.Load(), c.other.Load()}
}

// Sub returns a−b.
func (a Counts) Sub(b Counts) Counts {
	return Counts{a.Reads - b.Reads, a.Writes - b.Writes, a.Other - b.Other}
}

func (c *Counter) interceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	c.count(method, req)
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (c *Counter) count(method string, req any) {
	switch r := req.(type) {
	case *pb.PutRequest, *pb.DeleteRangeRequest:
		c.writes.Add(1)
	case *pb.RangeRequest:
		c.reads.Add(1)
	case *pb.TxnRequest:
		if txnWrites(r) {
			c.writes.Add(1)
		} else {
			c.reads.Add(1)
		}
	default:
		if strings.Contains(method, "/KV/") {
			c.writes.Add(1) // Compact
		} else {
			c.other.Add(1) // lease grant/revoke, status, auth
		}
	}
}

func txnWrites(t *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{t.Success, t.Failure} {
		for _, op := range ops {
			switch {
			case op.GetRequestPut() != nil, op.GetRequestDeleteRange() != nil:
				return true
			case op.GetRequestTxn() != nil && txnWrites(op.GetRequestTxn()):
				return true
			}
		}
	}
	return false
}
