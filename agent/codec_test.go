package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

var codecSeeds = []Msg{
	{Op: OpIncRef, Seq: 1, ID: "python-3.12"},
	{Op: OpReply, Seq: 18446744073709551615, OK: true},
	{Op: OpReply, Seq: 7, Err: `granary: incref "x": package does not exist`, Codes: []string{CodeNotExist}},
	{Op: OpHello, Purpose: "granary-run"},
	{Op: OpBuilderPG, Seq: 3, PID: -42},
	{Op: OpReply, Codes: []string{}},
	{Op: OpReply, Err: "<html> & \"quotes\" \\ é \x01"},
	{Op: OpReply, Hello: &Hello{Version: 1, Host: "h"}},
	{Op: OpReply, Seq: 1, OK: true, Hello: &Hello{Version: Version, Host: "vm", PID: 4242, Root: "/srv/granary", Prefix: "/granary/", UID: 1000, Linger: 10 * time.Minute}},
	{Op: OpReply, Hello: &Hello{Version: -1, PID: -2, UID: -3, Linger: -4, Root: "/a b/<c>"}},
	{Op: OpReply, Holders: []Holder{{UID: 1, PID: 2}}},
	{Op: OpBuild, Seq: 9, ID: "py-env", Needs: []string{"cpython-3.12", "zlib"}},
	{Op: OpBuild, Seq: 9, ID: "x", Needs: []string{}},
	{Op: OpPin, Seq: 10, ID: "x", For: 3, Note: "keep"},
}

// AppendMsg writes what json.Encoder writes, for every message.
func FuzzAppendMsg(f *testing.F) {
	for _, m := range codecSeeds {
		h := m.Hello
		if h == nil {
			h = &Hello{}
		}
		f.Add(m.Op, m.Seq, m.ID, m.Purpose, m.PID, m.OK, m.Err, strings.Join(m.Codes, "\x00"), len(m.Codes) > 0, strings.Join(m.Needs, "\x00"), len(m.Needs) > 0,
			m.Hello != nil, h.Version, h.Host, h.PID, h.Root, h.Prefix, h.UID, int64(h.Linger))
	}
	f.Fuzz(func(t *testing.T, op string, seq uint64, id, purpose string, pid int, ok bool, errMsg, codes string, hasCodes bool, needs string, hasNeeds bool,
		hasHello bool, version int, host string, hpid int, root, prefix string, uid int, linger int64) {
		m := Msg{Op: op, Seq: seq, ID: id, Purpose: purpose, PID: pid, OK: ok, Err: errMsg}
		if hasCodes {
			m.Codes = strings.Split(codes, "\x00")
		}
		if hasNeeds {
			m.Needs = strings.Split(needs, "\x00")
		}
		if hasHello {
			m.Hello = &Hello{Version: version, Host: host, PID: hpid, Root: root, Prefix: prefix, UID: uid, Linger: time.Duration(linger)}
		}
		var want bytes.Buffer
		if err := json.NewEncoder(&want).Encode(&m); err != nil {
			t.Fatal(err)
		}
		if got := AppendMsg(nil, &m); !bytes.Equal(got, want.Bytes()) {
			t.Fatalf("AppendMsg(%+v)\n got %s\nwant %s", m, got, want.Bytes())
		}
	})
}

// What DecodeMsg accepts, encoding/json decodes the same; and it accepts
// everything AppendMsg writes by hand.
func FuzzDecodeMsg(f *testing.F) {
	for _, m := range codecSeeds {
		f.Add(AppendMsg(nil, &m))
	}
	for _, s := range []string{
		`{}`, ` { "seq" : 5 , "op":"x" } `, `{"seq":05}`, `{"seq":5.0}`, `{"seq":-1}`, `{"OP":"x"}`,
		`{"op":"a","op":"b"}`, `{"ok":null}`, `{"codes":null}`, `{"pid":-0}`, `{"id":"a\u0062"}`, `{"seq":1}x`,
		`{"hello":{}}`, `{"hello":null}`, `{"hello":{"pid":1},"hello":{"uid":2}}`, `{"hello":{"Root":"/r"}}`,
		`{"hello":{"linger":-9223372036854775808,"version":1,"version":2}}`, `{"hello":{"linger":9223372036854775808}}`,
		`{"hello":{"host":"a\u0062"}}`, `{"hello":{"linger":1.5}}`, `{"hello":{"uid":1},"op":"reply"}`, `{"hello":[]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		var fast Msg
		if !DecodeMsg(line, &fast) {
			return
		}
		var slow Msg
		if err := json.Unmarshal(line, &slow); err != nil {
			t.Fatalf("DecodeMsg accepted %q, which encoding/json refuses: %v", line, err)
		}
		if !reflect.DeepEqual(fast, slow) {
			t.Fatalf("%q:\nDecodeMsg   %+v\nencoding/json %+v", line, fast, slow)
		}
	})
}

func TestDecodeMsgTakesFlatMessages(t *testing.T) {
	for _, m := range codecSeeds {
		line := AppendMsg(nil, &m)
		var got Msg
		if err := Decode(line, &got); err != nil {
			t.Fatalf("Decode(%s) = %v", line, err)
		}
		if flat(&m) && !DecodeMsg(line, &got) {
			t.Errorf("DecodeMsg refused its own flat message %s", line)
		}
		var want Msg                // what encoding/json makes of it (an empty Codes is omitted)
		json.Unmarshal(line, &want) //nolint:errcheck
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Decode(%s) = %+v, want %+v", line, got, want)
		}
	}
}

func TestLineReaderLongLines(t *testing.T) {
	long := `{"op":"reply","err":"` + strings.Repeat("x", 100_000) + `"}` + "\n"
	r := NewLineReader(strings.NewReader(`{"op":"a"}` + "\n" + long + `{"op":"b"}` + "\n" + `{"op":"c"}`))
	for i, want := range []string{`{"op":"a"}` + "\n", long, `{"op":"b"}` + "\n"} {
		got, err := r.Next()
		if err != nil || string(got) != want {
			t.Fatalf("line %d: %d bytes, %v; want %d bytes", i, len(got), err, len(want))
		}
	}
	if _, err := r.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("a last line without its newline: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the end: %v, want io.EOF", err)
	}
}

// chunks returns its chunks one per Read, and err instead of an empty one.
type chunks struct {
	parts []string
	err   error
}

func (c *chunks) Read(p []byte) (int, error) {
	if len(c.parts) == 0 {
		return 0, io.EOF
	}
	s := c.parts[0]
	c.parts = c.parts[1:]
	if s == "" {
		return 0, c.err
	}
	return copy(p, s), nil
}

// A read that fails mid-line (a read deadline, for Conn) loses nothing:
// the next call goes on with the partial line.
func TestLineReaderKeepsPartialLine(t *testing.T) {
	cut := errors.New("cut")
	r := NewLineReader(&chunks{parts: []string{`{"op":"a"}` + "\n" + `{"op":`, "", `"b"}` + "\n"}, err: cut})
	if got, err := r.Next(); err != nil || string(got) != `{"op":"a"}`+"\n" {
		t.Fatalf("first line: %q, %v", got, err)
	}
	if _, err := r.Next(); err != cut {
		t.Fatalf("mid-line: %v, want the reader's error", err)
	}
	if got, err := r.Next(); err != nil || string(got) != `{"op":"b"}`+"\n" {
		t.Fatalf("after the error: %q, %v; want the whole second line", got, err)
	}
}

func BenchmarkDecode(b *testing.B) {
	line := AppendMsg(nil, &Msg{Op: OpIncRef, Seq: 12345, ID: "python-3.12-abcdef"})
	b.Run("DecodeMsg", func(b *testing.B) {
		var m Msg
		for range b.N {
			DecodeMsg(line, &m)
		}
	})
	b.Run("encoding/json", func(b *testing.B) {
		var m Msg
		for range b.N {
			m = Msg{}
			json.Unmarshal(line, &m) //nolint:errcheck
		}
	})
}
