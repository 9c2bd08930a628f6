"use strict";(self.rspackChunkftwidgets=self.rspackChunkftwidgets||[]).push([[0],{16(t,e,r){var n=r(17),o=r.n(n),a=r(18),s=(r.n(a))()(o());s.push([t.id,`/* The ftwidgets status bar item and "Fine-tuning" sidebar. */

.ftw-status {
  padding: 0 var(--jp-ui-font-size0, 5px);
  cursor: pointer;
  line-height: 24px;
  white-space: nowrap;
}

.ftw-status[data-state='failed'] {
  color: var(--jp-error-color1);
}

.ftw-sidebar {
  min-width: 240px;
  padding: 8px;
  overflow-y: auto;
  background: var(--jp-layout-color1);
  color: var(--jp-ui-font-color1);
  font-size: var(--jp-ui-font-size1);
}

.ftw-sidebar-title {
  margin: 0 0 8px;
  font-size: var(--jp-ui-font-size2);
  font-weight: 600;
}

.ftw-note,
.ftw-no-subshells {
  margin: 0 0 8px;
  color: var(--jp-ui-font-color2);
}

.ftw-session {
  margin-bottom: 8px;
  padding: 8px;
  border: var(--jp-border-width) solid var(--jp-border-color2);
  border-radius: 4px;
}

.ftw-session-header {
  display: flex;
  justify-content: space-between;
  font-weight: 600;
}

.ftw-session-state[data-state='failed'],
.ftw-session-error {
  color: var(--jp-error-color1);
}

.ftw-facts {
  display: grid;
  grid-template-columns: auto 1fr;
  gap: 2px 8px;
  margin: 6px 0;
}

.ftw-facts dt {
  color: var(--jp-ui-font-color2);
}

.ftw-facts dd {
  margin: 0;
}

.ftw-spark polyline {
  fill: none;
  stroke: var(--jp-brand-color1);
  stroke-width: 1.5;
}

.ftw-session-error {
  margin: 4px 0;
  white-space: pre-wrap;
}

.ftw-buttons {
  display: flex;
  flex-wrap: wrap;
  gap: 4px;
  margin-top: 6px;
}

.ftw-buttons [hidden] {
  display: none;
}
`,""]),r.d(e,{},{A:s})},18(t){t.exports=function(t){var e=[];return e.toString=function(){return this.map(function(e){var r="",n=void 0!==e[5];return e[4]&&(r+="@supports (".concat(e[4],") {")),e[2]&&(r+="@media ".concat(e[2]," {")),n&&(r+="@layer".concat(e[5].length>0?" ".concat(e[5]):""," {")),r+=t(e),n&&(r+="}"),e[2]&&(r+="}"),e[4]&&(r+="}"),r}).join("")},e.i=function(t,r,n,o,a){"string"==typeof t&&(t=[[null,t,void 0]]);var s={};if(n)for(var i=0;i<this.length;i++){var c=this[i][0];null!=c&&(s[c]=!0)}for(var p=0;p<t.length;p++){var u=[].concat(t[p]);n&&s[u[0]]||(void 0!==a&&(void 0===u[5]||(u[1]="@layer".concat(u[5].length>0?" ".concat(u[5]):""," {").concat(u[1],"}")),u[5]=a),r&&(u[2]&&(u[1]="@media ".concat(u[2]," {").concat(u[1],"}")),u[2]=r),o&&(u[4]?(u[1]="@supports (".concat(u[4],") {").concat(u[1],"}"),u[4]=o):u[4]="".concat(o)),e.push(u))}},e}},17(t){t.exports=function(t){return t[1]}},10(t){var e=[];function r(t){for(var r=-1,n=0;n<e.length;n++)if(e[n].identifier===t){r=n;break}return r}function n(t,n){for(var o={},a=[],s=0;s<t.length;s++){var i=t[s],c=n.base?i[0]+n.base:i[0],p=o[c]||0,u="".concat(c," ").concat(p);o[c]=p+1;var l=r(u),f={css:i[1],media:i[2],sourceMap:i[3],supports:i[4],layer:i[5]};if(-1!==l)e[l].references++,e[l].updater(f);else{var d=function(t,e){var r=e.domAPI(e);return r.update(t),function(e){e?(e.css!==t.css||e.media!==t.media||e.sourceMap!==t.sourceMap||e.supports!==t.supports||e.layer!==t.layer)&&r.update(t=e):r.remove()}}(f,n);n.byIndex=s,e.splice(s,0,{identifier:u,updater:d,references:1})}a.push(u)}return a}t.exports=function(t,o){var a=n(t=t||[],o=o||{});return function(t){t=t||[];for(var s=0;s<a.length;s++){var i=r(a[s]);e[i].references--}for(var c=n(t,o),p=0;p<a.length;p++){var u=r(a[p]);0===e[u].references&&(e[u].updater(),e.splice(u,1))}a=c}}},12(t){var e={};t.exports=function(t,r){var n=function(t){if(void 0===e[t]){var r=document.querySelector(t);if(window.HTMLIFrameElement&&r instanceof window.HTMLIFrameElement)try{r=r.contentDocument.head}catch(t){r=null}e[t]=r}return e[t]}(t);if(!n)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");n.appendChild(r)}},14(t){t.exports=function(t){var e=document.createElement("style");return t.setAttributes(e,t.attributes),t.insert(e,t.options),e}},13(t,e,r){t.exports=function(t){var e=r.nc;e&&t.setAttribute("nonce",e)}},11(t){t.exports=function(t){if("u"<typeof document)return{update:function(){},remove:function(){}};var e=t.insertStyleElement(t);return{update:function(r){var n,o,a;n="",r.supports&&(n+="@supports (".concat(r.supports,") {")),r.media&&(n+="@media ".concat(r.media," {")),(o=void 0!==r.layer)&&(n+="@layer".concat(r.layer.length>0?" ".concat(r.layer):""," {")),n+=r.css,o&&(n+="}"),r.media&&(n+="}"),r.supports&&(n+="}"),(a=r.sourceMap)&&"u">typeof btoa&&(n+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(a))))," */")),t.styleTagTransform(n,e,t.options)},remove:function(){var t;null===(t=e).parentNode||t.parentNode.removeChild(t)}}}},15(t){t.exports=function(t,e){if(e.styleSheet)e.styleSheet.cssText=t;else{for(;e.firstChild;)e.removeChild(e.firstChild);e.appendChild(document.createTextNode(t))}}},9(t,e,r){var n=r(10),o=r.n(n),a=r(11),s=r.n(a),i=r(12),c=r.n(i),p=r(13),u=r.n(p),l=r(14),f=r.n(l),d=r(15),v=r.n(d),h=r(16),m={};m.styleTagTransform=v(),m.setAttributes=u(),m.insert=c().bind(null,"head"),m.domAPI=s(),m.insertStyleElement=f(),o()(h.A,m),h.A&&h.A.locals&&h.A.locals}}]);