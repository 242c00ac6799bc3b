package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"strconv"
	"time"
)

// The hot path's messages (incref, decref and their replies) are flat:
// an op, a sequence number, a package ID, a flag, perhaps an error.
// encoding/json spends ~4 µs decoding one of them by reflection on a
// 2-core machine, and an IncRef+DecRef pair through the node decodes
// four: a quarter of the pair. The handshake's reply (a flat message
// with a Hello) is coded by hand too: it is the first message a new
// process decodes, and encoding/json's first decode of a Msg builds its
// reflection caches for every type Msg can hold, ~0.2 ms of a warm
// granary-run job's ~3 ms. AppendMsg and DecodeMsg handle those by hand
// and leave everything else to encoding/json, byte for byte the same on
// the wire (FuzzAppendMsg and FuzzDecodeMsg check both directions
// against encoding/json).

// MaxLine bounds one message: a peer that sends a longer line is cut off.
// The longest legitimate message is an inspection with a reference per
// host of a large farm (~150 bytes each).
const MaxLine = 16 << 20

// LineReader reads the protocol's messages, one per line. Unlike a
// bufio.Reader's ReadSlice, it keeps a partial line when a read fails (a
// read deadline that interrupts a reader, agent's Conn uses them): the
// next call goes on where it stopped.
type LineReader struct {
	r          io.Reader
	buf        []byte
	start, end int // the unread bytes are buf[start:end]
	scanned    int // buf[start:scanned] holds no newline
}

// lineBuf is a LineReader's initial (and usual) buffer size.
const lineBuf = 4096

// NewLineReader reads lines from r.
func NewLineReader(r io.Reader) *LineReader { return &LineReader{r: r, buf: make([]byte, lineBuf)} }

// Next returns the next line, newline included. It is valid until the
// next call. After an error other than io.EOF the next call reads on from
// where it stopped; at io.EOF a partial last line is dropped
// (io.ErrUnexpectedEOF).
func (l *LineReader) Next() ([]byte, error) {
	for {
		if i := bytes.IndexByte(l.buf[l.scanned:l.end], '\n'); i >= 0 {
			line := l.buf[l.start : l.scanned+i+1]
			l.start = l.scanned + i + 1
			l.scanned = l.start
			return line, nil
		}
		l.scanned = l.end
		if l.end-l.start > MaxLine {
			return nil, fmt.Errorf("message from the local node longer than %d bytes", MaxLine)
		}
		l.room()
		n, err := l.r.Read(l.buf[l.end:])
		l.end += n
		switch {
		case err == io.EOF && n == 0 && l.end > l.start:
			l.start, l.end, l.scanned = 0, 0, 0
			return nil, io.ErrUnexpectedEOF
		case err != nil && n == 0:
			return nil, err
		}
	}
}

// room makes space to read into: the unread bytes move to the front of
// the buffer, which doubles if they fill it and shrinks back to lineBuf
// once a long line has gone.
func (l *LineReader) room() {
	if l.start == l.end && len(l.buf) > 16*lineBuf {
		l.buf = make([]byte, lineBuf)
	}
	if l.start > 0 {
		n := copy(l.buf, l.buf[l.start:l.end])
		l.scanned -= l.start
		l.start, l.end = 0, n
	}
	if l.end == len(l.buf) {
		l.buf = append(l.buf, make([]byte, len(l.buf))...)
	}
}

// Decode decodes one line into m: by hand if it is flat (DecodeMsg), else
// with encoding/json.
func Decode(line []byte, m *Msg) error {
	if DecodeMsg(line, m) {
		return nil
	}
	var slow Msg // on the heap, for encoding/json; m stays where its caller has it
	err := json.Unmarshal(line, &slow)
	*m = slow
	return err
}

// flat reports whether AppendMsg encodes m by hand: it has no nested
// values but a Hello, and its strings need no escaping.
func flat(m *Msg) bool {
	if m.Holders != nil || m.Info != nil || m.Event != nil || m.Outcome != nil ||
		m.Note != "" || m.For != 0 || m.Pin != nil || m.Report != nil || m.Why != nil {
		return false
	}
	if h := m.Hello; h != nil && !(plain(h.Host) && plain(h.Root) && plain(h.Prefix)) {
		return false
	}
	for _, s := range m.Codes {
		if !plain(s) {
			return false
		}
	}
	for _, s := range m.Needs {
		if !plain(s) {
			return false
		}
	}
	return plain(m.Op) && plain(m.ID) && plain(m.Purpose) && plain(m.Err)
}

// AppendMsg appends m and a newline to b, exactly as json.Encoder writes
// it.
func AppendMsg(b []byte, m *Msg) []byte {
	if !flat(m) {
		slow := *m // on the heap, for encoding/json; m stays where its caller has it
		j, err := json.Marshal(&slow)
		if err != nil { // cannot happen: Msg has only marshalable fields
			panic("agent: cannot encode a message: " + err.Error())
		}
		return append(append(b, j...), '\n')
	}
	b = append(b, `{"op":"`...)
	b = append(b, m.Op...)
	b = append(b, '"')
	if m.Seq != 0 {
		b = strconv.AppendUint(append(b, `,"seq":`...), m.Seq, 10)
	}
	b = appendString(b, "id", m.ID)
	b = appendString(b, "purpose", m.Purpose)
	if m.PID != 0 {
		b = strconv.AppendInt(append(b, `,"pid":`...), int64(m.PID), 10)
	}
	if m.OK {
		b = append(b, `,"ok":true`...)
	}
	b = appendString(b, "err", m.Err)
	b = appendStrings(b, "codes", m.Codes)
	b = appendStrings(b, "needs", m.Needs)
	if h := m.Hello; h != nil {
		b = strconv.AppendInt(append(b, `,"hello":{"version":`...), int64(h.Version), 10)
		b = append(append(append(b, `,"host":"`...), h.Host...), '"')
		b = strconv.AppendInt(append(b, `,"pid":`...), int64(h.PID), 10)
		b = append(append(append(b, `,"root":"`...), h.Root...), '"')
		b = append(append(append(b, `,"prefix":"`...), h.Prefix...), '"')
		b = strconv.AppendInt(append(b, `,"uid":`...), int64(h.UID), 10)
		b = strconv.AppendInt(append(b, `,"linger":`...), int64(h.Linger), 10)
		b = append(b, '}')
	}
	return append(b, "}\n"...)
}

// appendStrings appends a non-empty array of plain strings.
func appendStrings(b []byte, key string, vs []string) []byte {
	if len(vs) == 0 {
		return b
	}
	b = append(append(append(b, `,"`...), key...), `":[`...)
	for i, v := range vs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(append(append(b, '"'), v...), '"')
	}
	return append(b, ']')
}

func appendString(b []byte, key, v string) []byte {
	if v == "" {
		return b
	}
	b = append(append(append(b, `,"`...), key...), `":"`...)
	return append(append(b, v...), '"')
}

// plain reports whether json.Marshal writes s as it is: printable ASCII
// without the characters it escapes.
func plain(s string) bool {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c < 0x20 || c > 0x7e, c == '"', c == '\\', c == '<', c == '>', c == '&':
			return false
		}
	}
	return true
}

// DecodeMsg decodes a flat message (as AppendMsg writes it, in any field
// order, with any whitespace) into m and reports whether it could. It
// refuses anything it does not know for certain to decode as
// encoding/json would (an escape, a nested value other than one Hello,
// an unknown key, a key in another case, null, a number with a
// fraction), leaving the line to encoding/json.
func DecodeMsg(line []byte, m *Msg) bool {
	*m = Msg{}
	p := parser{b: line}
	if !p.byte('{') {
		return false
	}
	if p.byte('}') {
		return p.end()
	}
	for {
		key, ok := p.raw()
		if !ok || !p.byte(':') {
			return false
		}
		switch string(key) { // no allocation
		case "op":
			m.Op, ok = p.op()
		case "id":
			m.ID, ok = p.str()
		case "purpose":
			m.Purpose, ok = p.str()
		case "err":
			m.Err, ok = p.str()
		case "seq":
			m.Seq, ok = p.digits()
		case "pid":
			m.PID, ok = p.int()
		case "ok":
			m.OK, ok = p.bool()
		case "codes":
			m.Codes, ok = p.strs()
		case "needs":
			m.Needs, ok = p.strs()
		case "hello":
			// encoding/json would decode a second one into the first
			ok = m.Hello == nil
			if ok {
				m.Hello, ok = p.hello()
			}
		default:
			return false
		}
		if !ok {
			return false
		}
		if p.byte('}') {
			return p.end()
		}
		if !p.byte(',') {
			return false
		}
	}
}

// parser is DecodeMsg's cursor over one line.
type parser struct {
	b []byte
	i int
}

func (p *parser) space() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// byte consumes c (after whitespace) if it is next.
func (p *parser) byte(c byte) bool {
	p.space()
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

// end reports whether only whitespace is left.
func (p *parser) end() bool {
	p.space()
	return p.i == len(p.b)
}

// str reads a string of printable ASCII without escapes.
func (p *parser) str() (string, bool) {
	b, ok := p.raw()
	return string(b), ok
}

// op is str for an operation: the known ones without an allocation.
func (p *parser) op() (string, bool) {
	b, ok := p.raw()
	switch string(b) {
	case OpIncRef:
		return OpIncRef, ok
	case OpDecRef:
		return OpDecRef, ok
	case OpReply:
		return OpReply, ok
	}
	return string(b), ok
}

// raw reads a string of printable ASCII without escapes; the bytes are
// the line's.
func (p *parser) raw() ([]byte, bool) {
	if !p.byte('"') {
		return nil, false
	}
	start := p.i
	for ; p.i < len(p.b); p.i++ {
		switch c := p.b[p.i]; {
		case c == '"':
			p.i++
			return p.b[start : p.i-1], true
		case c == '\\' || c < 0x20 || c > 0x7e:
			return nil, false
		}
	}
	return nil, false
}

// digits reads a run of decimal digits without a leading zero (JSON's
// integers) that fits in a uint64, and fails on a fraction or exponent
// after it.
func (p *parser) digits() (uint64, bool) {
	p.space()
	start := p.i
	var n uint64
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		d := uint64(p.b[p.i] - '0')
		if n > (math.MaxUint64-d)/10 {
			return 0, false
		}
		n = n*10 + d
		p.i++
	}
	if p.i == start || (p.i-start > 1 && p.b[start] == '0') {
		return 0, false
	}
	if p.i < len(p.b) {
		switch p.b[p.i] {
		case '.', 'e', 'E':
			return 0, false
		}
	}
	return n, true
}

func (p *parser) int() (int, bool) {
	n, ok := p.int64()
	if !ok || n < math.MinInt || n > math.MaxInt {
		return 0, false
	}
	return int(n), true
}

func (p *parser) int64() (int64, bool) {
	p.space()
	neg := p.i < len(p.b) && p.b[p.i] == '-'
	if neg {
		p.i++
		if p.i < len(p.b) && (p.b[p.i] < '0' || p.b[p.i] > '9') {
			return 0, false // "- 1" is not JSON
		}
	}
	n, ok := p.digits()
	switch {
	case !ok:
		return 0, false
	case neg && n <= -math.MinInt64:
		return int64(-n), true // -math.MinInt64: the uint64 wraps to itself
	case !neg && n <= math.MaxInt64:
		return int64(n), true
	}
	return 0, false
}

// hello reads a Hello object whose keys are all Hello's own, in any order
// (missing ones stay zero, as encoding/json leaves them).
func (p *parser) hello() (*Hello, bool) {
	h := &Hello{}
	if !p.byte('{') {
		return nil, false
	}
	if p.byte('}') {
		return h, true
	}
	for {
		key, ok := p.raw()
		if !ok || !p.byte(':') {
			return nil, false
		}
		switch string(key) {
		case "version":
			h.Version, ok = p.int()
		case "host":
			h.Host, ok = p.str()
		case "pid":
			h.PID, ok = p.int()
		case "root":
			h.Root, ok = p.str()
		case "prefix":
			h.Prefix, ok = p.str()
		case "uid":
			h.UID, ok = p.int()
		case "linger":
			var n int64
			n, ok = p.int64()
			h.Linger = time.Duration(n)
		default:
			return nil, false
		}
		if !ok {
			return nil, false
		}
		if p.byte('}') {
			return h, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

func (p *parser) bool() (bool, bool) {
	p.space()
	rest := p.b[p.i:]
	switch {
	case len(rest) >= 4 && string(rest[:4]) == "true":
		p.i += 4
		return true, true
	case len(rest) >= 5 && string(rest[:5]) == "false":
		p.i += 5
		return false, true
	}
	return false, false
}

// strs reads an array of strings (not null).
func (p *parser) strs() ([]string, bool) {
	if !p.byte('[') {
		return nil, false
	}
	out := []string{}
	if p.byte(']') {
		return out, true
	}
	for {
		s, ok := p.str()
		if !ok {
			return nil, false
		}
		out = append(out, s)
		if p.byte(']') {
			return out, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}
